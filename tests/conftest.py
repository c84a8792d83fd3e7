import os
import sys

# the package lives in projects/largebatch (installed editable by `make`); make the tests work from a bare checkout too
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects"))
