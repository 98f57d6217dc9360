"""Turn a pytest-benchmark JSON file into a markdown table of medians and ratios.

    python benchmarks/summarize.py results.json [--baseline cifops]

For each benchmark group the row shows every implementation's median and its
ratio to the baseline (how many times slower than cifops it is).
"""

import argparse
import json
from collections import defaultdict


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    parser.add_argument("--baseline", default="cifops")
    args = parser.parse_args()
    with open(args.json_file) as f:
        data = json.load(f)
    groups = defaultdict(dict)
    for bench in data["benchmarks"]:
        impl = bench["extra_info"].get("impl", bench["name"])
        groups[bench["group"]][impl] = bench["stats"]["median"]
    info = data["machine_info"]
    print(
        f"Machine: {info.get('cpu', {}).get('brand_raw', info.get('processor'))}, "
        f"{info.get('cpu', {}).get('count', '?')} cores; date {data['datetime'][:10]}\n"
    )
    print("| benchmark | implementation | median (ms) | x slower than " + args.baseline + " |")
    print("| --- | --- | ---: | ---: |")
    for group, medians in groups.items():
        base = medians.get(args.baseline)
        for impl, median in sorted(medians.items(), key=lambda kv: kv[1]):
            ratio = f"{median / base:.1f}" if base else "-"
            print(f"| {group} | {impl} | {median * 1e3:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
