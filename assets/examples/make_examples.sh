#!/usr/bin/env bash
# Regenerates the example clips shipped for the app's Examples (license-free: synthesized here).
# Needs Debian's espeak-ng and sox. Each clip exercises a different input path on purpose.
set -euo pipefail
cd "$(dirname "$0")"
# Speech: 22.05 kHz mono wav (resampled to the CLAP rate).
espeak-ng -s 150 -w speech.wav "Good morning. This is a short recording of a person speaking, made for testing audio captioning."
# A wailing siren: four 2-s sweeps 600-1300 Hz, 44.1 kHz stereo ogg/vorbis (down-mixed and resampled).
sox -n -r 44100 -c 2 siren.ogg synth 2 sine 600:1300 repeat 3 vol 0.5
# Rain-like noise: 14 s of brown noise with a slow tremolo, 48 kHz flac (14 s = two 10-s windows).
sox -n -r 48000 -c 1 -b 16 rain.flac synth 14 brownnoise tremolo 0.3 40 vol 0.3
