"""The folders a job writes its checkpoints to, named without torch: the service archives them by name."""

FAKE_QUANT_DIR = "model"
PACKED_DIR = "packed"
GGUF_DIR = "gguf"
