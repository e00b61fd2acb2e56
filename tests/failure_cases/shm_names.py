"""Print the MPICH node segments (``/dev/shm/mpich_shm_*``) this rank maps, one ``SHM path`` line
each, so that a test can check that they are gone once the job has ended (README, "No memory left
behind"). Under other MPIs: no lines."""
import sys


def print_segments() -> None:
    try:
        with open("/proc/self/maps") as f:
            names = {line.split(None, 5)[5].strip() for line in f if "/dev/shm/mpich_shm_" in line}
    except (OSError, IndexError):
        return
    for name in sorted(names):
        print(f"SHM {name}", flush=True)
    sys.stdout.flush()
