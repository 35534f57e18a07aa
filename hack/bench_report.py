#!/usr/bin/env python3
"""Merges benchmark outputs into docs/bench/results.json and writes docs/BENCHMARKS.md.

Usage: bench_report.py OUT_DIR RESULTS_JSON BENCHMARKS_MD

OUT_DIR holds <bench>.json (one flat JSON object each) and <bench>.cmd (the
command that produced it). Existing keys in RESULTS_JSON that this run did not
measure are kept. The Markdown table lists every key with its target, when the
issues set one, and which run produced it.
"""
import datetime
import json
import os
import platform
import subprocess
import sys

# key -> (what it measures, target, comparison partner)
KNOWN = {
    "clone_start_ms_p50_256mib": ("request -> clone's first guest instruction, 256 MiB image (p50)", "<= 5 ms", None),
    "clone_start_ms_p99_256mib": ("same, p99", "<= 5 ms", None),
    "clone_start_ms_p50_4gib": ("request -> first guest instruction, 4 GiB image (p50)", "within 20% of 256 MiB", "clone_start_ms_p50_256mib"),
    "working_set_ms_p50_16mib": ("request -> guest touched 4096 new pages (16 MiB), lazy uffd memory (p50)", "<= 40 ms (Firecracker here: 212 ms uffd, 34 ms file)", None),
    "capture_pause_ms_p50_1gib": ("source paused while capturing a 1 GiB guest (p50)", "<= 20 ms", None),
    "fault_local_us_p50": ("one 4 KiB first-touch fault served from the local page store (p50)", "<= 1.5x uffd_raw_roundtrip_us_p50", "uffd_raw_roundtrip_us_p50"),
    "uffd_raw_roundtrip_us_p50": ("bare userfaultfd fault round trip, same run (p50)", "reference", None),
    "clones50_host_mib": ("host memory (sum of VM processes' PSS) for 50 clones of a 1 GiB image, each touching 16 MiB", "<= clones50_budget_mib", "clones50_budget_mib"),
    "clones50_budget_mib": ("budget: distinct image pages touched + 50 x (16 MiB + 4 MiB)", "reference", None),
    "remote_fault_us_p50": ("first-touch fault across a veth hop (p50)", "", None),
    "remote_fault_us_p99": ("first-touch fault across a veth hop (p99)", "", None),
    "stream_gbps": ("1 GiB image streamed across the hop", ">= 0.8 x raw_tcp_gbps", "raw_tcp_gbps"),
    "raw_tcp_gbps": ("raw TCP throughput over the same hop, same run", "reference", None),
    "clones50_shared_host_mib": ("50 clones of a 1 GiB image, 16 MiB shared reads + 4 MiB private writes each: host memory", "<= clones50_shared_budget_mib", "clones50_shared_budget_mib"),
    "clones50_shared_budget_mib": ("budget: one copy of touched image pages + 50 x (4 MiB + VMM overhead)", "reference", None),
    "migration_downtime_ms_p50_1gib": ("postcopy downtime, 1 GiB (p50)", "<= 3 ms", None),
    "migration_downtime_ms_p50_4gib": ("postcopy downtime, 4 GiB (p50)", "<= 3 ms, independent of size", None),
    "migration_downtime_ms_p99_1gib": ("postcopy downtime, 1 GiB (p99)", "<= 3 ms", None),
    "migration_total_s_1gib": ("total migration time, 1 GiB fully dirtied", "<= 1.3 x migration_floor_s_1gib", "migration_floor_s_1gib"),
    "migration_floor_s_1gib": ("1 GiB / raw TCP throughput, same run", "reference", None),
    "migration_bytes_ratio": ("bytes sent / bytes dirtied since the image", "<= 1.05", None),
    "scale_3_to_30_s": ("kubectl scale 3 -> 30 until all Running (e2e)", "<= 3 s", None),
    "linux_clone_first_echo_ms_p50": ("Linux clone (project kernel, virtio-blk/net/rng, 128 MiB, copy-on-write, warm shell, tap opened before the request): restore_linux request -> reply to one ICMP echo request sent at the request (the next 1 s later; lost first requests are counted in linux_clone_first_echo_lost_first) (p50). Reference here: QEMU 7.2 restoring the same kind of kernel answers ~65 ms after `cont`, ~170 ms after process start", "<= 25 ms", None),
    "linux_clone_first_echo_ms_p99": ("same, p99", "", None),
    "linux_clone_first_echo_ms_tap_at_restore_p50": ("as linux_clone_first_echo_ms_probe_1ms, the tap opened by the VMM during the restore (carrier change and link-watch in the path), same run (p50)", "reference", "linux_clone_first_echo_ms_probe_1ms_p50"),
    "linux_clone_first_echo_ms_probe_1ms_p50": ("same with an echo request every 1 ms until the first reply: each probe interrupts the emulated guest while it answers the first, which slows that answer 2-4x here; same run (p50)", "", "linux_clone_first_echo_ms_p50"),
    "linux_clone_probe_1ms_lost_first": ("clones of the 1 ms-probe variant whose first request got no reply", "", None),
    "linux_clone_lazy_first_echo_ms_p50": ("as linux_clone_first_echo_ms_probe_1ms with lazy (userfaultfd) memory (p50)", "", None),
    "linux_clone_first_echo_lost_first": ("clones of the headline whose first (only) echo request got no reply: each adds ~1 s (honest count)", "", None),
    "linux_clone_restore_ms_p50": ("the restore_linux call of those clones (p50)", "", None),
    "linux_boot_to_echo_s": ("Linux boot request (warm shell) -> first ICMP echo reply, probed every 10 ms; every guest instruction emulated here", "", None),
    "linux_capture_pause_ms": ("Linux source paused while captured (once idle, 128 MiB)", "", None),
    "linux_capture_total_ms": ("Linux capture start -> image complete", "", None),
}


def machine():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    if os.path.exists("/sys/module/kvm_pvm"):
        kvm = "PVM (kvm_pvm, shadow paging, guest code emulated)"
    elif os.path.exists("/sys/module/kvm_intel") or os.path.exists("/sys/module/kvm_amd"):
        kvm = "hardware (kvm_intel/kvm_amd)"
    elif os.path.exists("/dev/kvm"):
        kvm = "present (module not identified)"
    else:
        kvm = "none"
    return f"{os.cpu_count()} x {cpu}, {mem:.0f} GiB, Linux {platform.release()}, KVM: {kvm}"


def main():
    out_dir, results_path, md_path = sys.argv[1:4]
    results = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
    origin = results.pop("_origin", {}) if isinstance(results.get("_origin"), dict) else {}
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    for name in sorted(os.listdir(out_dir)):
        if not name.endswith(".json"):
            continue
        bench = name[:-5]
        with open(os.path.join(out_dir, name)) as f:
            figures = json.load(f)
        cmd_file = os.path.join(out_dir, bench + ".cmd")
        cmd = open(cmd_file).read().strip() if os.path.exists(cmd_file) else bench
        for key, value in figures.items():
            if isinstance(value, (dict, list)):
                continue
            results[key] = value
            words = cmd.split()
            tool = os.path.basename(words[0]) if words else bench
            if tool == "cargo":
                tool = " ".join(words[:6])
            origin[key] = f"`{tool}` ({now})"
    results["machine"] = machine()
    results["date"] = now
    ordered = dict(sorted(results.items()))
    ordered["_origin"] = origin
    os.makedirs(os.path.dirname(results_path), exist_ok=True)
    with open(results_path, "w") as f:
        json.dump(ordered, f, indent=2, sort_keys=False)
        f.write("\n")

    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`hack/bench.sh`); the machine-readable figures are in",
        "`docs/bench/results.json`. Figures compared with each other are measured in the",
        "same run; these machines are noisy, so read medians, not single runs.",
        "",
        f"- machine: {results['machine']}",
        f"- last run: {now}",
        "",
        "## Issue targets",
        "",
        "| key | value | target | met | what | produced by |",
        "|---|---|---|---|---|---|",
    ]
    for key, (what, target, partner) in KNOWN.items():
        if key not in results:
            lines.append(f"| `{key}` | not measured yet | {target} | | {what} | |")
            continue
        value = results[key]
        met = verdict(key, value, results)
        lines.append(f"| `{key}` | {fmt(value)} | {target} | {met} | {what} | {origin.get(key, '')} |")
    other = [k for k in results if k not in KNOWN and k not in ("machine", "date")]
    if other:
        lines += ["", "## Other figures", "", "| key | value | produced by |", "|---|---|---|"]
        for key in sorted(other):
            lines.append(f"| `{key}` | {fmt(results[key])} | {origin.get(key, '')} |")
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {results_path} and {md_path}")


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def verdict(key, value, r):
    try:
        if key in ("clone_start_ms_p50_256mib", "clone_start_ms_p99_256mib"):
            return yes(value <= 5)
        if key == "clone_start_ms_p50_4gib" and "clone_start_ms_p50_256mib" in r:
            return yes(value <= 1.2 * r["clone_start_ms_p50_256mib"])
        if key == "working_set_ms_p50_16mib":
            return yes(value <= 40)
        if key == "capture_pause_ms_p50_1gib":
            return yes(value <= 20)
        if key == "fault_local_us_p50" and "uffd_raw_roundtrip_us_p50" in r:
            return yes(value <= 1.5 * r["uffd_raw_roundtrip_us_p50"])
        if key == "clones50_host_mib" and "clones50_budget_mib" in r:
            return yes(value <= r["clones50_budget_mib"])
        if key == "clones50_shared_host_mib" and "clones50_shared_budget_mib" in r:
            return yes(value <= r["clones50_shared_budget_mib"])
        if key == "stream_gbps" and "raw_tcp_gbps" in r:
            return yes(value >= 0.8 * r["raw_tcp_gbps"])
        if key.startswith("migration_downtime_ms"):
            return yes(value <= 3)
        if key == "migration_total_s_1gib" and "migration_floor_s_1gib" in r:
            return yes(value <= 1.3 * r["migration_floor_s_1gib"])
        if key == "migration_bytes_ratio":
            return yes(value <= 1.05)
        if key == "scale_3_to_30_s":
            return yes(value <= 3)
        if key == "linux_clone_first_echo_ms_p50":
            return yes(value <= 25)
    except TypeError:
        return ""
    return ""


def yes(b):
    return "yes" if b else "**no**"


if __name__ == "__main__":
    main()
