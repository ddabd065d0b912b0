"""`python -m mlm …` (so `torchrun -m mlm pretrain …` works)."""

from mlm.cli import main

if __name__ == "__main__":
    main()
