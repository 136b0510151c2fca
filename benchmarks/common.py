"""What the benchmark scripts share (run as `python benchmarks/NAME.py`, this folder is on sys.path)."""

import platform


def cpu_name() -> str:
    """The CPU's model name, for the setup line at the top of every benchmark table."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
