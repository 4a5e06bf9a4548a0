"""The three engines (audio encoder, motion generator, face decoder): pure torch modules.

Nothing here imports analysis-time libraries (mediapipe, sounddevice): the engines must load and
run on a GPU machine that has only torch and numpy.
"""
