"""Helpers shared by the benchmarks: the machine description, model presets, JSON output."""

import json
import os
import platform

import keras
import tensorflow as tf

from s2s_tf.models import autoencoder as ae_lib

# Autoencoder stage widths the benchmarks can choose with --ae.
AE_PRESETS = {
    "tiny": ((8,), (16,)),
    "small": ((16, 16), (32, 32), (64, 64)),  # the main job's
    "medium": ((32, 32), (64, 64), (128, 128)),
    "vgg3": ae_lib.VGG16_STAGE_WIDTHS[:3],
}


def machine_info():
    """What the numbers were measured on: CPU, accelerator, versions and load."""
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu_model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                cpu_model,
            )
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = tf.config.list_logical_devices("GPU")
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": cpu_model,
        "device": ", ".join(d.name for d in gpus) if gpus else "CPU",
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def load_note(machine, advice=""):
    """A line warning that other processes shared the CPU, or None on a quiet machine."""
    load = machine["load_average_at_start"]
    if load is None or load <= 0.5 * machine["cpus_usable"]:
        return None
    return f"  note: load average {load:.2f} at start; other processes share the CPU, so " + (
        f"rates are noisy{advice}"
    )


def write_json(results, path):
    """Writes `results` to `path` (if given) and says so."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(f"  wrote {path}", flush=True)


def print_report(lines, machine, advice=""):
    """Prints a benchmark's report lines, then the machine-load note if the machine was busy."""
    note = load_note(machine, advice)
    print("\n".join([*lines, note] if note else lines), flush=True)
