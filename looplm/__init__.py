"""looplm: looped (weight-tied, recurrent-depth) language models, built in a runnable textbook.

This file is the package's index, the one module written by hand: every other module is
generated from a chapter of the book (its first line names the chapter). It re-exports
the public names listed in the book's preface.
"""

__version__ = "0.1.0"
