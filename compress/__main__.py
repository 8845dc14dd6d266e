"""``python -m compress ...``: the ``compress`` command where no console script is installed
(a machine with the project on PYTHONPATH only, such as the GPU machine)."""
from .cli import main

if __name__ == "__main__":
    main()
