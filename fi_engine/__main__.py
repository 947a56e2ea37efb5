import sys

from .cli import main

if __name__ == "__main__":  # `python -m fi_engine`; importing the module (a test listing the package) runs nothing
    sys.exit(main())
