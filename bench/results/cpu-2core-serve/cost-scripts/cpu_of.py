"""Print the CPU seconds of the bentoml serve listening on a port (bench's own helper)."""
import sys
from bench.baseline import ServerProcesses
print(f"{ServerProcesses(int(sys.argv[1])).cpu_seconds():.3f}")
