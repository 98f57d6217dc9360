import os
import platform

import torch


def pytest_report_header(config):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"cifops benchmarks: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores ({cpu}), GPU: {gpu}"
    )
