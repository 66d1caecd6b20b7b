from mtkit.cli import main

# Guarded: multiprocessing's "spawn" imports this module again in every worker.
if __name__ == "__main__":
    main()
