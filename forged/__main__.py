from forged.cli import forged_entry

# Guarded: TensorRT-LLM's executor worker is spawned through mpi4py, and a spawned process imports
# the main module again; unguarded, `python -m forged` would start a second daemon in it.
if __name__ == "__main__":
    forged_entry()
