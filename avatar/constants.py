"""Clock, audio and frame constants shared by every stage. Derived values are computed, not retyped."""

SAMPLE_RATE = 16_000  # Hz, the audio every engine sees
FPS = 40  # frames per second, the frame clock
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 400 samples = 25 ms of audio per frame
FRAME_MS = 1000 / FPS  # 25.0 ms
FRAME_SIZE = 512  # output frames are FRAME_SIZE x FRAME_SIZE RGB

assert SAMPLES_PER_FRAME * FPS == SAMPLE_RATE
