"""The commands behind the console scripts: a whole training run and a checkpoint's evaluation.

They sit above every other package (config, builders, training, evaluation), which keeps the package's
import graph free of cycles: nothing below imports a command.
"""
