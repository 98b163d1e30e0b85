"""Procedural sound synthesis (numpy only) for sources no Debian package records.

Every generator has the signature ``gen(rng, n, speed, pitch) -> float32 array of n samples at 16 kHz`` where speed
is "fast"/"slow"/None (event rate or modulation rate) and pitch is "high"/"low"/None (synthesis frequency). Levels
are arbitrary: the composer sets the loudness afterwards. Generators randomise everything else (jitter, timbre,
rhythm) from ``rng`` so that two events of one class never sound identical.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import dsp
from .dsp import SR, colored_noise, envelope, filt, fft_convolve, reverb_ir

Generator = Callable[[np.random.Generator, int, "str | None", "str | None"], np.ndarray]


# --------------------------------------------------------------------------------------------------------------------
# building blocks


def _t(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float32) / SR


def _place(buf: np.ndarray, sig: np.ndarray, pos: int) -> None:
    """Add sig into buf at sample pos, clipped to buf's bounds."""
    if pos >= buf.size or pos + sig.size <= 0:
        return
    a, b = max(pos, 0), min(pos + sig.size, buf.size)
    buf[a:b] += sig[a - pos: b - pos]


def _decay(n: int, tau: float) -> np.ndarray:
    return np.exp(-_t(n) / tau).astype(np.float32)


def _slow_env(rng: np.random.Generator, n: int, rate_hz: float, depth: float) -> np.ndarray:
    """Smooth random gain curve (1 +- depth) varying at about rate_hz: gusts, swells, crowd ebb."""
    k = max(int(n / SR * rate_hz) + 3, 4)
    points = 1.0 + depth * rng.uniform(-1.0, 1.0, k)
    return np.interp(np.linspace(0, k - 1, n), np.arange(k), points).astype(np.float32)


def _onsets(rng: np.random.Generator, n: int, interval: float, jitter: float = 0.15, start: float = 0.05) -> list[int]:
    """Roughly periodic event times (samples) with relative jitter."""
    out, t = [], start + rng.uniform(0, interval * 0.3)
    while t < n / SR - 0.05:
        out.append(int(t * SR))
        t += interval * (1.0 + rng.uniform(-jitter, jitter))
    return out


def _poisson(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    count = rng.poisson(rate * n / SR)
    return np.sort(rng.integers(0, max(n, 1), count))


def _scatter(rng: np.random.Generator, n: int, rate: float, templates: list[np.ndarray],
             gain: tuple[float, float] = (0.3, 1.0)) -> np.ndarray:
    """Dense random events (drops, bubbles, claps, crackles): a few precomputed templates placed at Poisson times.

    Synthesising (or filtering) every one of hundreds of events separately would dominate the build time.
    """
    out = np.zeros(n, np.float32)
    pos = _poisson(rng, n, rate)
    which = rng.integers(len(templates), size=pos.size)
    gains = rng.uniform(*gain, pos.size).astype(np.float32)
    for p, k, g in zip(pos.tolist(), which.tolist(), gains.tolist()):
        seg = templates[k][: n - p]
        out[p: p + seg.size] += g * seg
    return out


def _damped(freqs: list[float], taus: list[float], dur: float, amps: list[float] | None = None) -> np.ndarray:
    """Sum of exponentially damped sines: struck objects (wood, drops, ticks)."""
    t = _t(int(dur * SR))
    amps = amps or [1.0] * len(freqs)
    return sum(a * np.sin(2 * np.pi * f * t) * np.exp(-t / tau) for f, tau, a in zip(freqs, taus, amps)).astype(np.float32)


def _burst(rng: np.random.Generator, dur: float, tau: float, lo: float | None, hi: float | None) -> np.ndarray:
    """Band-limited noise burst with exponential decay: claps, scuffs, crackles."""
    n = max(int(dur * SR), 16)
    return (filt(rng.standard_normal(n).astype(np.float32), lo, hi) * _decay(n, tau)).astype(np.float32)


def _tone(freq: np.ndarray | float, n: int, harmonics: list[float], phase: float = 0.0) -> np.ndarray:
    """Harmonic tone with a (possibly time-varying) fundamental."""
    f = np.broadcast_to(np.asarray(freq, dtype=np.float64), (n,))
    ph = 2 * np.pi * np.cumsum(f) / SR + phase
    return sum(a * np.sin((k + 1) * ph) for k, a in enumerate(harmonics)).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# weather and water


def rain(rng, n, speed=None, pitch=None):
    """Hiss of many tiny drops plus individually audible drops hitting surfaces."""
    bed = colored_noise(rng, n, 0.6, lo=700, hi=rng.uniform(6000, 7800)) * _slow_env(rng, n, 0.5, 0.15)
    drops = [_damped([rng.uniform(1500, 5000)], [rng.uniform(0.003, 0.01)], 0.04) for _ in range(6)]
    return bed + 0.5 * _scatter(rng, n, rng.uniform(25, 60), drops, (0.3, 1.5))


def wind(rng, n, speed=None, pitch=None):
    """Low rushing noise in gusts, with a faint whistle band that follows the gust strength."""
    gust = _slow_env(rng, n, rng.uniform(0.2, 0.5), 0.8) ** 2
    roar = colored_noise(rng, n, 1.6, lo=60, hi=rng.uniform(700, 1200)) * gust
    centre = rng.uniform(350, 700)
    whistle = colored_noise(rng, n, 0.0, lo=centre * 0.85, hi=centre * 1.15) * gust ** 1.5
    return roar + 0.25 * whistle


def thunder(rng, n, speed=None, pitch=None):
    """A crack (near strikes) followed by a long rolling low rumble."""
    out = np.zeros(n, np.float32)
    start = int(rng.uniform(0.0, 0.15) * n)
    m = n - start
    env = _decay(m, rng.uniform(0.8, 2.0) * m / SR / 3) * _slow_env(rng, m, 3.0, 0.6)
    env *= envelope(m, 0.05, 0.3)
    rumble = colored_noise(rng, m, 2.0, lo=25, hi=rng.uniform(180, 350)) * env
    crack = _burst(rng, 0.35, 0.06, 300, 4000) * rng.uniform(0.2, 0.8)
    out[start:] = rumble
    _place(out, crack, start)
    return out


def running_water(rng, n, speed=None, pitch=None):
    """A stream or tap: broadband flow noise plus dense bubble chirps (what makes water sound wet)."""
    flow = colored_noise(rng, n, 0.8, lo=250, hi=5000) * _slow_env(rng, n, 2.0, 0.2)
    bubbles = []
    for _ in range(8):
        m = int(rng.uniform(0.01, 0.03) * SR)
        freq = rng.uniform(500, 2500) * (1.0 + 1.5 * _t(m) / (m / SR))  # bubbles rise in pitch
        bubbles.append(_tone(freq, m, [1.0]) * _decay(m, m / SR / 3))
    return 0.6 * flow + 0.5 * _scatter(rng, n, rng.uniform(80, 200), bubbles, (0.2, 1.0))


def dripping(rng, n, speed=None, pitch=None):
    """Single drops into water: short rising 'plink' with a little room echo."""
    out = np.zeros(n, np.float32)
    interval = {"fast": 0.3, "slow": 1.1}.get(speed or "", 0.6)
    base = {"high": 2400.0, "low": 900.0}.get(pitch or "", 1500.0)
    for pos in _onsets(rng, n, interval, 0.25):
        m = int(0.08 * SR)
        f = base * rng.uniform(0.85, 1.15) * (1.0 + 0.6 * _t(m) / 0.08)
        _place(out, _tone(f, m, [1.0, 0.15]) * _decay(m, 0.018) * rng.uniform(0.6, 1.0), pos)
    return out + 0.25 * fft_convolve(out, reverb_ir(rng, 0.5))


def ocean_waves(rng, n, speed=None, pitch=None):
    """Surf: broadband noise swelling and crashing every few seconds."""
    out = colored_noise(rng, n, 1.0, lo=80, hi=4500) * 0.15
    period = rng.uniform(4.0, 7.0)
    t0 = rng.uniform(-period, 0.0)
    while t0 < n / SR:
        m = int(period * 1.3 * SR)
        t = _t(m)
        shape = (np.clip(t / (0.45 * period), 0, 1) ** 2) * np.exp(-np.clip(t - 0.45 * period, 0, None) / (0.3 * period))
        wave = colored_noise(rng, m, 0.7, lo=150, hi=rng.uniform(3000, 6000)) * shape
        _place(out, wave.astype(np.float32), int(t0 * SR))
        t0 += period * rng.uniform(0.8, 1.2)
    return out


# --------------------------------------------------------------------------------------------------------------------
# fire, animals


def fire(rng, n, speed=None, pitch=None):
    """Crackling fire: low roar plus sharp random crackles and pops."""
    roar = colored_noise(rng, n, 1.8, lo=40, hi=600) * _slow_env(rng, n, 1.0, 0.3) * 0.5
    crackles = []
    for _ in range(5):
        length = rng.uniform(0.002, 0.012)
        crackles.append(_burst(rng, length * 4, length, 800, 7000))
    return roar + _scatter(rng, n, rng.uniform(8, 25), crackles, (0.5, 4.0))


def crickets(rng, n, speed=None, pitch=None):
    """Chirping crickets: trains of short tone pulses around 3-5 kHz, a few insects layered."""
    out = np.zeros(n, np.float32)
    base = {"high": 4800.0, "low": 3000.0}.get(pitch or "", 4000.0)
    gap = {"fast": 0.35, "slow": 1.0}.get(speed or "", 0.6)
    for _ in range(rng.integers(1, 4)):
        f = base * rng.uniform(0.93, 1.07)
        pulse_n = int(0.012 * SR)
        pulse = _tone(f, pulse_n, [1.0, 0.1]) * np.hanning(pulse_n).astype(np.float32)
        gain = rng.uniform(0.4, 1.0)
        for pos in _onsets(rng, n, gap, 0.2):
            for k in range(rng.integers(2, 5)):
                _place(out, pulse * gain, pos + k * int(0.025 * SR))
    return out


def birds(rng, n, speed=None, pitch=None):
    """Bird song: groups of fast frequency sweeps (chirps) between 2 and 7 kHz."""
    out = np.zeros(n, np.float32)
    base = {"high": 5000.0, "low": 2600.0}.get(pitch or "", 3600.0)
    gap = {"fast": 0.5, "slow": 1.4}.get(speed or "", 0.9)
    for pos in _onsets(rng, n, gap, 0.4):
        for k in range(rng.integers(2, 6)):
            m = int(rng.uniform(0.04, 0.12) * SR)
            f0 = base * rng.uniform(0.8, 1.2)
            sweep = f0 * (1.0 + rng.uniform(-0.4, 0.4) * np.sin(np.pi * _t(m) / (m / SR)))
            _place(out, _tone(sweep, m, [1.0, 0.05]) * np.hanning(m).astype(np.float32), pos + k * int(0.1 * SR))
    return out


# --------------------------------------------------------------------------------------------------------------------
# people (non-speech)


def footsteps(rng, n, speed=None, pitch=None):
    """Steps on a hard floor: low heel thump plus a scuff, alternating feet slightly."""
    out = np.zeros(n, np.float32)
    interval = {"fast": 0.32, "slow": 0.75}.get(speed or "", 0.5)
    floor = rng.uniform(90, 180)
    for k, pos in enumerate(_onsets(rng, n, interval, 0.08)):
        gain = rng.uniform(0.7, 1.0) * (0.85 if k % 2 else 1.0)
        thump = _damped([floor * rng.uniform(0.9, 1.1), floor * 2.7], [0.03, 0.012], 0.12, [1.0, 0.4])
        scuff = _burst(rng, 0.09, 0.025, 400, 4000) * 0.5
        _place(out, (thump + np.pad(scuff, (0, thump.size - scuff.size))) * gain, pos)
    return out + 0.2 * fft_convolve(out, reverb_ir(rng, 0.4))


def knocking(rng, n, speed=None, pitch=None):
    """Knuckles on a wooden door: groups of 2-4 knocks with resonant wood modes."""
    out = np.zeros(n, np.float32)
    inner = {"fast": 0.12, "slow": 0.32}.get(speed or "", 0.2)
    modes = [rng.uniform(180, 260), rng.uniform(420, 560), rng.uniform(900, 1300)]
    t = rng.uniform(0.05, 0.3)
    while t < n / SR - 0.2:
        for _ in range(rng.integers(2, 5)):
            knock = _damped(modes, [0.03, 0.015, 0.006], 0.15, [1.0, 0.6, 0.3]) + _burst(rng, 0.15, 0.003, 1000, 6000)
            _place(out, knock * rng.uniform(0.8, 1.0), int(t * SR))
            t += inner * rng.uniform(0.9, 1.1)
        t += rng.uniform(0.8, 1.6)
    return out + 0.15 * fft_convolve(out, reverb_ir(rng, 0.35))


def applause(rng, n, speed=None, pitch=None):
    """Many people clapping: dense random hand claps with an overall swell."""
    env = envelope(n, 0.3, 0.6) * _slow_env(rng, n, 0.6, 0.2)
    claps = []
    for _ in range(6):
        centre = rng.uniform(900, 2500)
        claps.append(_burst(rng, 0.03, 0.006, centre * 0.6, centre * 1.6))
    out = _scatter(rng, n, rng.uniform(60, 140), claps, (0.4, 1.0)) * env
    return out + 0.25 * fft_convolve(out, reverb_ir(rng, 0.8))


def breathing(rng, n, speed=None, pitch=None):
    """Slow in/out breaths: band-limited noise with a smooth breath-shaped envelope."""
    out = np.zeros(n, np.float32)
    period = {"fast": 1.6, "slow": 4.0}.get(speed or "", 2.6)
    for k, pos in enumerate(_onsets(rng, n, period / 2, 0.1, start=0.0)):
        m = int(period / 2 * 0.85 * SR)
        shape = np.sin(np.pi * np.arange(m) / m).astype(np.float32) ** 1.5
        lo, hi = (300, 2500) if k % 2 == 0 else (200, 1800)
        _place(out, colored_noise(rng, m, 0.8, lo=lo, hi=hi) * shape * (1.0 if k % 2 else 0.7), pos)
    return out


def babble(rng, n, speed=None, pitch=None):
    """Crowd chatter without recordings: several formant-synthesised 'voices' talking over each other.

    Syllables of all voices are sorted into one bucket per vowel and each bucket is formant-filtered once, so the
    cost is a few FFTs however many voices talk.
    """
    vowels = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410),
              (440, 1020, 2240), (660, 1720, 2410), (490, 1350, 1690)]
    buckets = np.zeros((len(vowels), n), np.float32)
    for _ in range(rng.integers(5, 9)):
        f0 = rng.uniform(95, 240) * _slow_env(rng, n, 4.0, 0.12)
        src = (np.cumsum(f0) / SR % 1.0 - 0.5).astype(np.float32) * rng.uniform(0.3, 1.0)  # sawtooth glottis
        t = rng.uniform(0, 0.5)
        while t < n / SR:
            m, a = int(rng.uniform(0.12, 0.3) * SR), int(t * SR)
            seg = src[a: a + m] * np.hanning(m).astype(np.float32)[: src[a: a + m].size]
            buckets[rng.integers(len(vowels)), a: a + seg.size] += seg
            t += m / SR * 0.8 + (rng.uniform(0.3, 1.0) if rng.random() < 0.15 else 0.0)
    size = dsp.fast_len(n)
    out = np.zeros(n, np.float32)
    for bucket, formants in zip(buckets, vowels):
        shape = sum(dsp.band_shape(size, SR, f * 0.88, f * 1.12) * g for f, g in zip(formants, (1.0, 0.6, 0.3)))
        out += np.fft.irfft(np.fft.rfft(bucket, size) * shape, size)[:n].astype(np.float32)
    return out + 0.4 * fft_convolve(out, reverb_ir(rng, 0.9))


# --------------------------------------------------------------------------------------------------------------------
# machines and signals


def car_engine(rng, n, speed=None, pitch=None):
    """Combustion engine: firing-rate harmonics with cycle jitter, plus exhaust noise; idling or revving."""
    rpm = rng.uniform(700, 1000) * (1.8 if pitch == "high" else 1.0)
    curve = _slow_env(rng, n, 0.4, 0.15)
    if rng.random() < 0.4:  # a rev: rpm climbs and falls once
        curve = curve + 1.2 * np.sin(np.pi * np.clip(np.linspace(-0.3, 1.3, n), 0, 1)) ** 2
    fire_hz = rpm / 60 * 2 * curve  # 4 cylinders, 4-stroke: 2 firings per revolution
    harm = [1.0, 0.7, 0.5, 0.45, 0.3, 0.2, 0.18, 0.12, 0.1, 0.08]
    body = _tone(fire_hz * (1 + 0.01 * rng.standard_normal(n)), n, harm)
    noise = colored_noise(rng, n, 1.5, lo=40, hi=1500) * 0.35
    return filt(body, 25, 2500) + noise


def siren(rng, n, speed=None, pitch=None):
    """Emergency siren: a bright tone sweeping up and down (slow 'wail' or fast 'yelp')."""
    lo, hi = (800.0, 1600.0) if pitch == "high" else (500.0, 1000.0)
    period = rng.uniform(0.25, 0.4) if speed == "fast" else rng.uniform(2.5, 4.5)
    phase = rng.uniform(0, 2 * np.pi)
    t = _t(n)
    sweep = lo + (hi - lo) * 0.5 * (1 - np.cos(2 * np.pi * t / period + phase))
    return _tone(sweep, n, [1.0, 0.35, 0.2, 0.1])


def helicopter(rng, n, speed=None, pitch=None):
    """Rotor chop: low noise amplitude-modulated at the blade-pass rate, with turbine whine."""
    blade = rng.uniform(11, 18)
    t = _t(n)
    chop = (0.35 + 0.65 * (0.5 + 0.5 * np.sin(2 * np.pi * blade * t)) ** 6).astype(np.float32)
    body = colored_noise(rng, n, 1.2, lo=40, hi=1800) * chop
    whine = _tone(rng.uniform(1800, 3000), n, [1.0]) * 0.03
    return body + whine


def clock_ticking(rng, n, speed=None, pitch=None):
    """Mechanical clock: short bright clicks, alternating tick and tock."""
    out = np.zeros(n, np.float32)
    interval = {"fast": 0.25, "slow": 1.0}.get(speed or "", 0.5)
    base = {"high": 4200.0, "low": 1800.0}.get(pitch or "", 3000.0)
    for k, pos in enumerate(_onsets(rng, n, interval, 0.01)):
        f = base * (1.0 if k % 2 == 0 else 0.8)
        click = _damped([f, f * 1.6], [0.004, 0.002], 0.03) + _burst(rng, 0.03, 0.001, 2000, None) * 0.3
        _place(out, click, pos)
    return out + 0.15 * fft_convolve(out, reverb_ir(rng, 0.3))


def beeping(rng, n, speed=None, pitch=None):
    """Electronic beeps: a steady pure tone switched on and off."""
    out = np.zeros(n, np.float32)
    f = rng.uniform(2000, 3000) if pitch == "high" else rng.uniform(500, 900)
    period = rng.uniform(0.25, 0.4) if speed == "fast" else rng.uniform(0.9, 1.4)
    m = int(period * rng.uniform(0.35, 0.55) * SR)
    beep = _tone(f, m, [1.0, 0.0, 0.12]) * envelope(m, 0.003, 0.005)
    for pos in _onsets(rng, n, period, 0.0):
        _place(out, beep, pos)
    return out


def alarm(rng, n, speed=None, pitch=None):
    """Digital alarm clock: groups of four fast beeps, repeated."""
    out = np.zeros(n, np.float32)
    f = rng.uniform(2500, 3500)
    m = int(0.06 * SR)
    beep = _tone(f, m, [1.0, 0.0, 0.3]) * envelope(m, 0.002, 0.004)
    for pos in _onsets(rng, n, 1.0, 0.0):
        for k in range(4):
            _place(out, beep, pos + k * int(0.12 * SR))
    return out


def phone_ring(rng, n, speed=None, pitch=None):
    """Telephone bell: two close tones warbling at 20 Hz, ringing on and off."""
    out = np.zeros(n, np.float32)
    f1 = rng.uniform(400, 1200)
    m = int(rng.uniform(0.4, 1.8) * SR)
    warble = (0.5 + 0.5 * np.sign(np.sin(2 * np.pi * 20 * _t(m)))).astype(np.float32)
    ring = (_tone(f1, m, [1.0, 0.3, 0.2]) + _tone(f1 * 1.2, m, [0.8, 0.2])) * warble * envelope(m, 0.01, 0.05)
    for pos in _onsets(rng, n, m / SR + rng.uniform(0.4, 1.5), 0.0):
        _place(out, ring, pos)
    return out


def radio_static(rng, n, speed=None, pitch=None):
    """Untuned radio: hiss with crackles, fading and an occasional heterodyne whistle."""
    hiss = colored_noise(rng, n, 0.2, lo=200, hi=6500) * _slow_env(rng, n, 1.5, 0.35)
    crackles = [_burst(rng, 0.02, 0.004, 500, 7000) for _ in range(4)]
    out = hiss + _scatter(rng, n, rng.uniform(5, 20), crackles, (1.0, 4.0))
    if rng.random() < 0.5:
        out += _tone(rng.uniform(800, 3000) * _slow_env(rng, n, 0.5, 0.2), n, [1.0]) * 0.15
    return out


def gunshot(rng, n, speed=None, pitch=None):
    """Gunshots: a sharp broadband blast with a low boom and an outdoor echo tail."""
    out = np.zeros(n, np.float32)
    interval = {"fast": 0.25, "slow": 1.2}.get(speed or "", 0.8)
    count = rng.integers(1, 4) if speed != "fast" else rng.integers(3, 7)
    t = rng.uniform(0.05, 0.3)
    for _ in range(count):
        if t > n / SR - 0.2:
            break
        blast = _burst(rng, 0.5, 0.04, 100, 6000) * 2.0 + _damped([rng.uniform(50, 90)], [0.08], 0.5)
        _place(out, blast, int(t * SR))
        t += interval * rng.uniform(0.8, 1.2)
    return out + 0.35 * fft_convolve(out, reverb_ir(rng, 1.2, damp_hz=2500.0))


GENERATORS: dict[str, Generator] = {
    "rain": rain, "wind": wind, "thunder": thunder, "running_water": running_water, "dripping": dripping,
    "ocean_waves": ocean_waves, "fire": fire, "crickets": crickets, "birds": birds, "footsteps": footsteps,
    "knocking": knocking, "applause": applause, "breathing": breathing, "babble": babble, "car_engine": car_engine,
    "siren": siren, "helicopter": helicopter, "clock_ticking": clock_ticking, "beeping": beeping, "alarm": alarm,
    "phone_ring": phone_ring, "radio_static": radio_static, "gunshot": gunshot,
}
