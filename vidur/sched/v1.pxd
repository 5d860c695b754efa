# Cython declarations for the optional compiled simulator (vidur/speedups.py): this module's code, compiled, reads the
# fields of the engine's native classes directly where its annotations name them.
from vidur.engine cimport Engine, Seq
