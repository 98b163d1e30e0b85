"""The sound classes: how each is rendered, which attributes it has, and the words used to caption it.

Everything the captioner says about a class comes from its phrase bank here; the test prompts are phrased with words
that no bank of that class uses, so zero-shot evaluation measures generalisation through the text encoder rather than
string overlap with training captions. ``validate()`` enforces that at import time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

ATTRIBUTES = ("loudness", "distance", "speed", "pitch")
VALUES = {"loudness": ("loud", "quiet"), "distance": ("near", "far"), "speed": ("fast", "slow"),
          "pitch": ("high", "low")}
LDSP = ATTRIBUTES
LD = ("loudness", "distance")
LDS = ("loudness", "distance", "speed")
LDP = ("loudness", "distance", "pitch")


@dataclass(frozen=True)
class Material:
    """One way of rendering a class: kind in {proc, gm, gm_drums, espeak, asterisk, theme, crowd}."""
    kind: str
    ref: str = ""
    weight: float = 1.0

    @property
    def procedural(self) -> bool:
        return self.kind == "proc"


@dataclass(frozen=True)
class Group:
    """Subjects and verbs that combine grammatically ("a siren" + "blare"). A trailing '+' marks a plural subject."""
    subjects: tuple[str, ...]
    verbs: tuple[str, ...]
    adj_ok: bool = True  # attribute adjectives may precede the subject ("a distant siren", not "a distant someone")


@dataclass(frozen=True)
class Words:
    """How one attribute value is said: adjectives before a noun, adverbials after a verb (or after a noun)."""
    adj: tuple[str, ...] = ()
    adv: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceClass:
    label: str
    source: str
    materials: tuple[Material, ...]
    attrs: tuple[str, ...]
    band_hz: tuple[float, float]
    groups: tuple[Group, ...]
    nominals: tuple[str, ...]
    test_prompts: tuple[str, ...]
    details: tuple[str, ...] = ()
    words: dict = field(default_factory=dict)
    kind: str = "continuous"  # continuous sounds can fill a clip; "short" ones are brief events
    dur: tuple[float, float] = (1.5, 10.0)

    def procedural_only(self) -> "SourceClass":
        return SourceClass(**{**self.__dict__, "materials": tuple(m for m in self.materials if m.procedural)})


DEFAULT_WORDS: dict[tuple[str, str], Words] = {
    ("loudness", "loud"): Words(("loud",), ("loudly",)),
    ("loudness", "quiet"): Words(("quiet", "faint", "soft"), ("quietly", "softly", "faintly")),
    ("distance", "near"): Words(("nearby",), ("nearby", "close by", "up close", "right next to the microphone")),
    ("distance", "far"): Words(("distant", "faraway", "far-off"), ("in the distance", "far away", "from afar")),
    ("speed", "fast"): Words(("fast", "rapid", "quick"), ("quickly", "rapidly", "at a fast pace")),
    ("speed", "slow"): Words(("slow", "unhurried"), ("slowly", "at a slow pace", "at a leisurely pace")),
    ("pitch", "high"): Words(("high-pitched",), ("at a high pitch",)),
    ("pitch", "low"): Words(("low-pitched", "deep"), ("at a low pitch",)),
}
SPEECH_WORDS = {
    ("loudness", "loud"): Words((), ("loudly", "in a loud voice")),
    ("loudness", "quiet"): Words((), ("quietly", "softly", "in a quiet voice")),
    ("speed", "fast"): Words((), ("quickly", "rapidly", "fast")),
    ("speed", "slow"): Words((), ("slowly", "at a slow pace", "in a slow, measured way")),
    ("pitch", "high"): Words((), ("in a high voice", "in a high-pitched voice")),
    ("pitch", "low"): Words((), ("in a deep voice", "in a low voice")),
}
MUSIC_WORDS = {
    ("speed", "fast"): Words(("fast", "lively", "upbeat"), ("quickly", "at a fast tempo", "at a brisk tempo")),
    ("speed", "slow"): Words(("slow", "calm"), ("slowly", "at a slow tempo", "at a gentle tempo")),
    ("pitch", "high"): Words((), ("in a high register", "on high notes", "high up on the scale")),
    ("pitch", "low"): Words((), ("in a low register", "on low notes", "low down on the scale")),
}


def _m(kind: str, ref: str = "", weight: float = 1.0) -> Material:
    return Material(kind, ref, weight)


def _g(subjects: str, verbs: str, adj_ok: bool = True) -> Group:
    """Compact group syntax: ';'-separated subjects and verbs."""
    return Group(tuple(s.strip() for s in subjects.split(";")), tuple(v.strip() for v in verbs.split(";")), adj_ok)


def _t(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(";"))


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _instrument(label: str, program: int, sing: str, player: str, prompts: str, band: tuple[float, float],
                extra: str = "", details: str = "") -> SourceClass:
    """Instruments share templates: the instrument plays, or a player plays the instrument."""
    return SourceClass(
        label, label.replace(" ", "_"), (_m("gm", str(program)),), LDSP, band,
        (_g(_a(sing) + (f"; {extra}" if extra else ""), "play; be played; play a melody; play a short piece; "
            "play a tune; play a simple melody; play a few phrases"),
         _g(f"someone; {player}; a musician", f"play the {sing}; play a melody on the {sing}; practise on the "
            f"{sing}; perform on the {sing}; play a tune on the {sing}", False)),
        _t(f"{_a(sing)}; {sing} music; {_a(sing)} melody; the sound of {_a(sing)}; {_a(sing)} tune; {_a(sing)} solo; "
           f"someone playing the {sing}"), _t(prompts),
        _t(details or "in a living room; in a concert hall; as a solo; during a rehearsal; in a practice room"), MUSIC_WORDS, "continuous", (1.5, 10.0))


CLASSES: tuple[SourceClass, ...] = (
    # ---------------------------------------------------------------- people
    SourceClass("woman speaking", "woman_speech",
                (_m("asterisk", "en", 3.0), _m("espeak", "female")), LD, (150, 4000),
                (_g("a woman; a lady; a woman's voice; a woman on a recording",
                    "speak; talk; say something; make an announcement; give instructions; read out a message; "
                    "explain something; announce something; deliver a recorded message; read a prompt aloud; "
                    "address the listener", False),),
                _t("a woman speaking; a woman talking; a woman's voice; a lady speaking; a recorded announcement "
                   "by a woman; a woman giving instructions"),
                _t("female narrator; feminine spoken words; adult female conversing"),
                _t("in an even tone; in a clear, steady tone; as if reading a phone menu; in a friendly way"),
                SPEECH_WORDS),
    SourceClass("man speaking", "man_speech", (_m("espeak", "male"),), LDSP, (100, 5000),
                (_g("a man; a guy; a man's voice; a computerised man's voice; a synthesised man's voice",
                    "speak; talk; say something; read something aloud; give a short speech; make a statement; "
                    "read out a sentence; announce something; give directions; explain something", False),),
                _t("a man speaking; a man talking; a man's voice; a guy talking; a synthetic man's voice; "
                   "a man reading a sentence"),
                _t("male narrator; masculine spoken words; a gentleman conversing"),
                _t("in a flat, mechanical tone; in a monotone; as if reading a text; in a robotic way"),
                SPEECH_WORDS),
    SourceClass("child speaking", "child_speech", (_m("espeak", "child"),), LDS, (200, 6000),
                (_g("a child; a kid; a young child; a little kid; a little boy; a little girl; a young kid",
                    "speak; talk; say something; read aloud; babble away; recite a sentence; read a sentence aloud; "
                    "tell a short story", False),),
                _t("a child speaking; a kid talking; a child's voice; a young child talking; a little kid reading "
                   "aloud"),
                _t("youngster chattering; a pupil reciting; juvenile narrator"),
                _t("in a squeaky tone; in an excited way; in a thin, bright voice"), SPEECH_WORDS),
    SourceClass("whispering", "whisper", (_m("espeak", "whisper"),), ("distance", "speed"), (300, 7000),
                (_g("someone; a person; a voice; a man; a woman", "whisper; whisper something; speak in a whisper; "
                    "whisper a few words; breathe out words; say something under their breath; whisper a sentence",
                    False),),
                _t("whispering; a whisper; someone whispering; whispered words; a whispered sentence; "
                   "breathy whispering"),
                _t("hushed murmuring; secretive hushed talk"),
                _t("in a breathy way; without using their voice; as if telling a secret"), SPEECH_WORDS),
    SourceClass("crowd", "crowd", (_m("crowd", "speech", 3.0), _m("proc", "babble")), LD, (100, 5000),
                (_g("a crowd; a large crowd; a gathering", "chatter; talk; talk over each other; mingle and talk; "
                    "fill the room with chatter"),
                 _g("a group of people; many people+; people+; several people+; guests+",
                    "chatter; talk; talk over each other; mingle and talk; have conversations|has conversations|"
                    "having conversations", False)),
                _t("a crowd; crowd chatter; people talking; a chattering crowd; many voices; the chatter of many "
                   "people; indistinct conversation"),
                _t("throng of bystanders; bustling cafeteria hubbub"),
                _t("in a large hall; at a party; in a busy room; at a reception"), {}),
    SourceClass("applause", "applause", (_m("gm", "126"), _m("proc", "applause")), LD, (300, 7000),
                (_g("an audience; people+; a group of people; spectators+; a crowd of listeners",
                    "clap; applaud; cheer and clap; clap enthusiastically; give a round of applause", False),
                 _g("applause", "ring out; erupt; break out; fill the room; rise")),
                _t("applause; clapping; a round of applause; people clapping; an audience applauding; enthusiastic clapping"),
                _t("ovation; hands slapping together in approval"),
                _t("in a concert hall; in an auditorium; at the end of a show"), {}),
    SourceClass("breathing", "breathing", (_m("gm", "121"), _m("proc", "breathing")), LD, (200, 4000),
                (_g("someone; a person", "breathe; breathe in and out|breathes in and out|breathing in and out; inhale and exhale; take a breath|takes a breath|taking a breath", False),
                 _g("breaths+", "come and go; rush in and out|rush in and out|rushing in and out")),
                _t("breathing; someone breathing; breaths; the sound of breathing; a person inhaling and exhaling; "
                   "breaths in and out"),
                _t("respiration; lungs drawing air"),
                _t("into the microphone; in a steady rhythm; as if out of breath"), {}),
    SourceClass("footsteps", "footsteps", (_m("proc", "footsteps"),), LDS, (60, 4000),
                (_g("someone; a person", "walk; walk across a tiled floor; step across the room; "
                    "walk along a corridor", False),
                 _g("footsteps+; steps+", "echo; sound; tap on a wooden floor; thud")),
                _t("footsteps; someone walking; steps on a tiled floor; walking; a person walking; the sound of "
                   "footsteps"),
                _t("shoes clacking on pavement; a pedestrian strolling"),
                _t("in a hallway; on a tiled floor; across a wooden floor; in an empty corridor"), {}),
    SourceClass("knocking", "knocking", (_m("proc", "knocking"),), LDS, (120, 3000),
                (_g("someone; a person", "knock on a door; knock at the door; knock several times; "
                    "knock on the door", False),
                 _g("knocks+", "sound; echo; come from a door")),
                _t("knocking; knocking on a door; a knock at the door; repeated knocking; someone knocking; knocks on "
                   "a wooden door"),
                _t("a visitor at the entrance; someone rapping with their fist"),
                _t("at the front door; impatiently; in short bursts; on a wooden door"), {},
                "short", (0.8, 6.0)),
    # ---------------------------------------------------------------- music
    _instrument("piano", 0, "piano", "a pianist", "keyboard instrument; ivory keys struck", (60, 4500),
                "a grand piano; an upright piano"),
    _instrument("violin", 40, "violin", "a violinist", "fiddle; bowed string instrument", (180, 6000)),
    _instrument("guitar", 24, "guitar", "a guitarist", "strumming a six-string; plucked folk strings", (70, 5000),
                "an acoustic guitar"),
    _instrument("flute", 73, "flute", "a flautist", "woodwind instrument; breathy piping", (250, 6000)),
    _instrument("trumpet", 56, "trumpet", "a trumpeter", "brass fanfare; bugle call", (160, 6000)),
    _instrument("organ", 19, "organ", "an organist", "cathedral hymn accompaniment; a harmonium", (40, 5000),
                "a church organ", "in a church; in a large church; "
                "in a reverberant hall"),
    SourceClass("drums", "drums", (_m("gm_drums", "0"),), LDS, (40, 8000),
                (_g("drums+; a drum kit; a drummer; a drum set", "play; play a rhythm; play a groove; keep time; "
                    "play a steady pattern; lay down a rock groove"),
                 _g("someone", "play the drums; play a rhythm on a drum kit", False)),
                _t("drums; drumming; a drum kit; a drum rhythm; a drum groove; a rock drum pattern"),
                _t("percussion beat; snare and cymbals"),
                _t("in a rehearsal room; in a steady rhythm; with kick and hi-hat"), MUSIC_WORDS),
    _instrument("xylophone", 13, "xylophone", "a musician", "mallet percussion; marimba", (300, 7000)),
    # ---------------------------------------------------------------- animals and nature
    SourceClass("bird", "bird", (_m("gm", "123"), _m("proc", "birds")), LDP, (1500, 8000),
                (_g("a bird; birds+; a little bird; songbirds+; a songbird", "chirp; tweet; sing; twitter; warble; "
                    "sing a short song; chirp repeatedly"),),
                _t("birds chirping; a bird singing; birdsong; chirping birds; tweeting birds; a bird's song"),
                _t("avian calls; sparrows in a garden"),
                _t("in the trees; outdoors; in the morning; in a park"), {}),
    SourceClass("crickets", "crickets", (_m("proc", "crickets"),), LDS, (2500, 6000),
                (_g("crickets+; insects+; a cricket; cicadas+", "chirp; chirr; trill; buzz rhythmically; chirp in pulses; "
                    "sing in the dark"),),
                _t("crickets chirping; chirping crickets; insects chirping; the chirr of crickets; a chorus of "
                   "crickets; insect chirps"),
                _t("grasshoppers at dusk; nocturnal bugs"),
                _t("in a field; in the grass; outside at night; in the countryside"), {}),
    SourceClass("rain", "rain", (_m("proc", "rain"),), LD, (500, 8000),
                (_g("rain; rainfall; a rain shower; a shower of rain",
                    "fall; pour; patter; come down; splash down; drum on the roof; keep falling; spatter"),
                 _g("raindrops+; drops of rain+", "patter; fall; splash; hit the ground; tap on the window; "
                    "drum on a roof")),
                _t("rain; rainfall; falling rain; the sound of rain; pattering rain; a rain shower"),
                _t("precipitation; drizzle"),
                _t("against the windows; outside; on the street"),
                {("loudness", "loud"): Words(("heavy", "loud", "hard"), ("heavily", "hard", "loudly")),
                 ("loudness", "quiet"): Words(("light", "gentle", "soft"), ("lightly", "gently", "softly"))}),
    SourceClass("wind", "wind", (_m("proc", "wind"),), LD, (40, 1600),
                (_g("wind; the wind; a gusty wind; a cold wind", "blow; howl; whoosh; rush past; roar; whistle; sweep by; "
                    "buffet the microphone"),
                 _g("gusts of wind+; blasts of wind+", "blow; whoosh; rush past; come and go")),
                _t("wind; blowing wind; gusts of wind; the wind howling; whooshing wind; wind noise"),
                _t("gale; breezy air currents"),
                _t("outside; through the trees; across an open field; against a microphone"),
                {("loudness", "loud"): Words(("strong", "loud", "fierce"), ("loudly", "hard", "fiercely")),
                 ("loudness", "quiet"): Words(("light", "gentle", "soft"), ("gently", "softly", "lightly"))}),
    SourceClass("thunder", "thunder", (_m("proc", "thunder"),), LD, (20, 600),
                (_g("thunder; a thunderclap; a peal of thunder", "rumble; roll; crash; boom; roar; roll across the sky; "
                    "crack and rumble"),),
                _t("thunder; a thunderclap; rumbling thunder; a roll of thunder; a thunderstorm; booming thunder"),
                _t("lightning strike; stormy heavens"),
                _t("during a storm; across the sky; overhead; in a thunderstorm"),
                {("loudness", "loud"): Words(("loud", "powerful"), ("loudly", "powerfully"))}, "continuous",
                (2.0, 8.0)),
    SourceClass("ocean waves", "ocean_waves", (_m("gm", "122"), _m("proc", "ocean_waves")), LD, (60, 6000),
                (_g("waves+; ocean waves+; the sea; the surf; breakers+", "crash; break; roll in; wash in; surge; "
                    "lap against the rocks; wash over the sand"),),
                _t("ocean waves; waves crashing; the sea; surf; crashing waves; the ocean; breaking waves"),
                _t("seaside beach; tide on the coast"),
                _t("against the rocks; on the sand; onto the shore; in a steady rhythm"),
                {("loudness", "loud"): Words(("loud", "big", "powerful"), ("loudly", "powerfully")),
                 ("loudness", "quiet"): Words(("quiet", "gentle", "small"), ("gently", "softly", "quietly"))}),
    SourceClass("running water", "running_water", (_m("proc", "running_water"),), LD, (200, 6000),
                (_g("water; a stream; a brook; a tap; a faucet", "run; flow; gurgle; splash; trickle; pour out; "
                    "rush; babble over stones"),),
                _t("running water; flowing water; a stream; water running from a tap; a babbling brook; "
                   "gurgling water"),
                _t("creek; river current; liquid gushing from a spigot"),
                _t("over some stones; into a sink; steadily; in a narrow channel"), {}),
    SourceClass("dripping water", "dripping", (_m("proc", "dripping"),), LDSP, (500, 5000),
                (_g("water; drops of water+; a tap", "drip; drip steadily; keep dripping"),
                 _g("drops+; water drops+", "fall into a puddle; plink; drip into a bucket")),
                _t("dripping water; water dripping; drops of water; a dripping tap; steady drips; drips falling into "
                   "water"),
                _t("leaking pipe; droplets plopping"),
                _t("into a bucket; in a cave; into a sink; in an empty room"), {}, "continuous", (1.5, 10.0)),
    SourceClass("fire", "fire", (_m("proc", "fire"),), LD, (30, 8000),
                (_g("a fire; a campfire; flames+; a fireplace; burning wood", "crackle; burn; pop and crackle; "
                    "hiss and crackle; snap and pop; burn steadily"),),
                _t("a crackling fire; a campfire; burning wood; fire crackling; crackling flames; a burning "
                   "fireplace"),
                _t("bonfire; logs ablaze in a hearth"),
                _t("outdoors; in a fireplace; at night; steadily"), {}),
    # ---------------------------------------------------------------- vehicles and machines
    SourceClass("car engine", "car_engine", (_m("proc", "car_engine"),), LDP, (20, 2500),
                (_g("a car engine; an engine; a car", "run; rumble; hum; purr; turn over"),),
                _t("a car engine; an engine running; a car with its engine running; a running engine; the rumble of "
                   "an engine; an engine humming"),
                _t("automobile; a motor vehicle"),
                _t("in a parking lot; on the street; in a garage; at a standstill"),
                {("pitch", "high"): Words(("revving", "high-revving"), ("at high revs", "at high speed")),
                 ("pitch", "low"): Words(("idling", "low"), ("at low revs", "at idle"))}),
    SourceClass("helicopter", "helicopter", (_m("gm", "125"), _m("proc", "helicopter")), LD, (30, 2500),
                (_g("a helicopter; a hovering helicopter", "fly; hover; fly by; whir; thump; circle above; "
                    "hover in place"),),
                _t("a helicopter; a helicopter flying; the whir of a helicopter; helicopter rotors; the "
                   "thumping of rotors; a hovering helicopter"),
                _t("rotorcraft; chopper blades overhead"),
                _t("in the sky; above the city; over a field"), {}),
    SourceClass("siren", "siren", (_m("proc", "siren"),), LDSP, (400, 5000),
                (_g("a siren; a police siren; a fire truck siren; a warning siren", "blare; sound; howl; go off; "
                    "ring out; rise and fall; scream"),),
                _t("a siren; a police siren; a blaring siren; a siren going off; a howling siren; the sound "
                   "of a siren"),
                _t("emergency vehicle wail; an ambulance"),
                _t("on the street; somewhere in the city; down the road"),
                {("speed", "fast"): Words(("rapid", "fast-cycling"), ("rapidly", "in quick cycles")),
                 ("speed", "slow"): Words(("slow", "slow-sweeping"), ("slowly", "in long sweeps")),
                 ("pitch", "high"): Words(("high-pitched", "shrill"), ("at a high pitch",))}),
    SourceClass("clock ticking", "clock", (_m("proc", "clock_ticking"),), LDSP, (700, 8000),
                (_g("a clock; a wall clock; an old clock; a mechanical clock", "tick; tick steadily; tick away; "
                    "tick and tock; keep ticking"),),
                _t("a ticking clock; a clock ticking; the ticking of a clock; ticking; steady ticking; a "
                   "clock's ticks"),
                _t("timepiece; pendulum mechanism"),
                _t("in a silent room; on the wall; steadily; in an empty room"), {}),
    SourceClass("gunshot", "gunshot", (_m("gm", "127"), _m("proc", "gunshot")), LDS, (40, 6000),
                (_g("a gun; gunshots+; shots+; a gunshot", "fire; go off; ring out; bang; echo"),
                 _g("someone", "fire a gun; shoot a gun", False)),
                _t("gunshots; a gunshot; gunfire; shots being fired; bangs of gunfire; shots ringing out"),
                _t("firearm discharge; rifle blasts"),
                _t("outdoors; at a shooting range; in an open area"),
                {("speed", "fast"): Words(("rapid", "rapid-fire"), ("in rapid succession", "rapidly", "in quick bursts")),
                 ("speed", "slow"): Words(("occasional", "sporadic"), ("one at a time", "sporadically",
                                                                       "with long pauses in between"))},
                "short", (0.6, 5.0)),
    # ---------------------------------------------------------------- signals and devices
    SourceClass("telephone ringing", "telephone",
                (_m("gm", "124"), _m("theme", "freedesktop/phone-incoming-call"), _m("proc", "phone_ring")), LD,
                (300, 6000),
                (_g("a telephone; a phone; an old telephone; a desk phone", "ring; ring repeatedly; keep ringing; "
                    "ring and ring; ring insistently"),),
                _t("a telephone ringing; a ringing phone; a phone ringing; the ring of a telephone; a ringing "
                   "telephone; a phone's ringtone"),
                _t("incoming call on a landline; a handset trilling"),
                _t("in an office; in another room; on a desk; unanswered"), {}),
    SourceClass("alarm clock", "alarm_clock",
                (_m("theme", "freedesktop/alarm-clock-elapsed", 2.0), _m("proc", "alarm")), LD, (1500, 8000),
                (_g("an alarm clock; an alarm; a digital alarm clock; a clock alarm", "go off; beep; ring; sound; buzz; "
                    "beep insistently; keep beeping"),),
                _t("an alarm clock; an alarm going off; a beeping alarm clock; an alarm ringing; an alarm "
                   "clock beeping; the beeps of an alarm"),
                _t("morning buzzer; bedside timer"),
                _t("in a bedroom; on a nightstand; repeatedly"), {}),
    SourceClass("bell", "bell",
                (_m("theme", "freedesktop/bell"), _m("theme", "Yaru/bell"), _m("gm", "14", 2.0)), LD, (200, 8000),
                (_g("a bell; bells+; a little bell; a church bell", "ring; clang; sound; peal; ring out; ding; "
                    "resonate"),),
                _t("a bell ringing; a ringing bell; bells; the ring of a bell; a bell's ding; bell strikes"),
                _t("gong; a handbell tolling"),
                _t("clearly; in a hall; in an empty room"), {}, "short", (0.5, 6.0)),
    SourceClass("camera shutter", "camera_shutter",
                (_m("theme", "freedesktop/camera-shutter"),), LD, (200, 8000),
                (_g("a camera; a camera shutter; a shutter", "click; snap; click sharply"),
                 _g("someone", "take a picture; take a photo with a camera", False)),
                _t("a camera shutter; a camera clicking; the click of a camera; shutter clicks; a camera shutter "
                   "clicking; the snap of a shutter"),
                _t("photograph being captured; snapshot"),
                _t("in an office; at a photo session; indoors"), {}, "short", (0.4, 3.0)),
    SourceClass("chime", "notification_chime",
                tuple(_m("theme", ref) for ref in (
                    "freedesktop/complete", "freedesktop/message", "freedesktop/message-new-instant",
                    "freedesktop/service-login", "freedesktop/device-added", "Yaru/complete", "Yaru/message",
                    "Yaru/message-new-instant", "Yaru/dialog-question", "Yaru/dialog-warning", "Yaru/device-added",
                    "Yaru/desktop-login", "Yaru/battery-low")),
                LD, (100, 8000),
                (_g("a chime; a notification sound; an alert tone; a phone notification", "chime; sound; play; go off; "
                    "play a short tune; ding"),
                 _g("a device; a computer; a laptop", "chime; play a notification sound|plays a notification sound|"
                    "playing a notification sound; play an alert tone; ding", False)),
                _t("a notification chime; a chime; an alert tone; a notification sound; a short electronic "
                   "melody; a system sound"),
                _t("smartphone ping; new email jingle"),
                _t("in an office; on a desk; for an incoming message"), {}, "short", (0.4, 5.0)),
    SourceClass("beeping", "beeping",
                (_m("proc", "beeping", 3.0), _m("theme", "freedesktop/phone-outgoing-busy"),
                 _m("theme", "freedesktop/phone-outgoing-calling")), LDSP, (300, 4000),
                (_g("a machine; a device; a beeper", "beep; beep repeatedly; emit beeps|emits beeps|emitting beeps; keep beeping",
                    False),
                 _g("beeps+; a beep", "sound; repeat; ring out")),
                _t("beeping; beeps; a beeping machine; repeated beeps; a series of beeps; beeping from a machine"),
                _t("electronic bleeps; a microwave signalling"),
                _t("steadily; over and over; at regular intervals"),
                {("pitch", "high"): Words(("high-pitched", "shrill", "high"), ("at a high pitch",))}),
    SourceClass("radio static", "radio_static", (_m("proc", "radio_static"),), LD, (150, 7000),
                (_g("static; radio static; a radio; a detuned radio", "hiss; crackle; buzz; fizz; crackle and hiss; "
                    "sputter"),),
                _t("radio static; static; crackling static; a hissing radio; white noise from a radio; "
                   "a radio between stations"),
                _t("untuned receiver; interference on the airwaves"),
                _t("between stations; from a speaker; steadily"), {}),
)

# --------------------------------------------------------------------------------------------------------------------
# words: stems shared by the captioner, the build check and the tests

STOPWORDS = frozenset(
    "a an the of in on at to and or with from by for as is are be being been it its their this that someone "
    "something sound sounds noise noises audio recording clip".split())


def stem(word: str) -> str:
    """Crude suffix stripping so 'wail', 'wails', 'wailing' and 'wailed' collide (no NLP dependency)."""
    word = word.lower()
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    return word


def content_stems(text: str) -> set[str]:
    """Stems of the content words of a text (letters only, stopwords dropped)."""
    return {stem(w) for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 1 and w not in STOPWORDS}


def forbidden_stems(cls: SourceClass) -> set[str]:
    """Stems of the class's test prompts: never allowed in a training/validation caption of a clip with this class."""
    return set().union(*(content_stems(p) for p in cls.test_prompts))


def bank_text(cls: SourceClass) -> list[str]:
    """Every string the captioner may use for this class (subjects, verbs, nominals, details, attribute words)."""
    texts = [s.rstrip("+") for g in cls.groups for s in g.subjects] + [v for g in cls.groups for v in g.verbs]
    texts += list(cls.nominals) + list(cls.details)
    for words in {**DEFAULT_WORDS, **cls.words}.values():
        texts += list(words.adj) + list(words.adv)
    return texts


def train_terms(cls: SourceClass) -> list[str]:
    """Nouns and verbs that name this class in captions (classes.json 'train_terms')."""
    terms = {s.rstrip("+") for g in cls.groups for s in g.subjects} | {v for g in cls.groups for v in g.verbs}
    return sorted(terms | set(cls.nominals))


def _attribute_stems() -> set[str]:
    """Stems of the one-word attribute adjectives and adverbs ('faint', 'distant', 'rapidly', ...)."""
    words = [w for ws in DEFAULT_WORDS.values() for w in ws.adj + ws.adv]
    words += [w for c in CLASSES for ws in c.words.values() for w in ws.adj + ws.adv]
    return set().union(*(content_stems(w) for w in words if re.fullmatch(r"[a-z]+", w)))


def validate(classes: tuple[SourceClass, ...] = CLASSES) -> None:
    """Fail fast on catalogue mistakes (all listed at once): duplicate labels, unknown attributes, test prompts
    overlapping the phrase bank, fixed phrases that claim an attribute value or an order."""
    errors = []
    labels = [c.label for c in classes]
    if len(set(labels)) != len(labels):
        errors.append("duplicate class labels")
    for c in classes:
        if not set(c.attrs) <= set(ATTRIBUTES) or not (c.materials and c.test_prompts and c.groups and c.nominals):
            errors.append(f"{c.label}: incomplete entry")
        overlap = forbidden_stems(c) & set().union(*(content_stems(t) for t in bank_text(c)))
        if overlap:
            errors.append(f"{c.label}: test-prompt words {sorted(overlap)} also used in its captions")
        fixed = [s.rstrip("+") for g in c.groups for s in g.subjects] + [v for g in c.groups for v in g.verbs]
        fixed += list(c.nominals) + list(c.details)
        for text in fixed:  # words that always appear must not claim an attribute value the event may not have
            clash = ATTRIBUTE_STEMS & content_stems(text)
            if clash:
                errors.append(f"{c.label}: {text!r} uses attribute words {sorted(clash)}")
            order = ORDER_WORDS & set(re.findall(r"[a-z]+", text))
            if order:
                errors.append(f"{c.label}: {text!r} uses order words {sorted(order)}")
    if errors:
        raise AssertionError("soundworld catalogue errors:\n" + "\n".join(errors))


ATTRIBUTE_STEMS = _attribute_stems()
ORDER_WORDS = {"after", "before", "then", "first", "finally", "later", "afterwards", "meanwhile", "while"}
validate()
BY_LABEL = {c.label: c for c in CLASSES}
