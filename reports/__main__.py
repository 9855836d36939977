"""`python -m reports --results results --out reports/out`: build the tables, figures and report.html."""

from __future__ import annotations

import argparse
import logging

from reports.build import build_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m reports", description=__doc__)
    parser.add_argument("--results", default="results", help="folder of run records [default: results]")
    parser.add_argument("--out", default="reports/out", help="output folder [default: reports/out]")
    parser.add_argument("--data-root", default=None, help="CIFAR-10 root (Figure 1 of preset cifar10)")
    parser.add_argument("--no-figure1", action="store_true", help="skip Figure 1 (reads the training images)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    written = build_report(args.results, args.out, data_root=args.data_root, figure1=not args.no_figure1)
    print(f"report: {written['report.html']}")
    print(f"{len(written)} files under {args.out}/ (tables/*.md|csv|tex, figures/*.png|pdf per preset/protocol)")


if __name__ == "__main__":
    main()
