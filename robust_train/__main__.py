"""`python -m robust_train ...` is `robust-train ...`."""

from robust_train.cli import train_main

if __name__ == "__main__":
    train_main()
