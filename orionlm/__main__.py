"""`python -m orionlm`: the command line of orionlm.cli."""

from orionlm.cli import main

if __name__ == "__main__":
    main()
