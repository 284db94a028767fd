"""Scripts that run under a serving runtime's own interpreter (llama-cpp-python, vLLM) and score
token windows there; they import nothing from this package, since that interpreter may lack torch."""
