"""STiCA: space-time crop & attend, audio-visual pretraining with a GPU-fed data path."""
