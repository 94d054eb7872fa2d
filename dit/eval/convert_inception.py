"""Convert pytorch-fid's Inception weights (.pth, needs torch) to a .safetensors file that loads without torch.

    python -m dit.eval.convert_inception --pth pt_inception-2015-12-05-6726825d.pth \\
        --out pt_inception-2015-12-05-6726825d.safetensors

The output holds the same keys and shapes (torch layout, float32, num_batches_tracked dropped); its metadata
records the .pth's name and SHA-256. Pass it to dit.eval.inception.load_inception like the .pth.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dit.errors import UserError, report
from dit.eval.inception import InceptionError, check_state_dict, read_state_dict, sha256_of


def convert(pth: Path, out: Path) -> str:
    """Writes `out` from `pth`; returns the .pth's SHA-256."""
    if not pth.is_file():
        raise InceptionError(f"no file at {pth}; give the path of pytorch-fid's Inception weights (.pth).")
    if pth.suffix not in (".pth", ".pt"):
        raise InceptionError(f"--pth {pth} is not a .pth file; give pytorch-fid's Inception weights.")
    if out.suffix != ".safetensors":
        raise InceptionError(f"--out {out} must end in .safetensors.")
    sd = check_state_dict(read_state_dict(pth), str(pth))
    digest = sha256_of(pth)
    from safetensors.numpy import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out), metadata={"source": pth.name, "source_sha256": digest})
    return digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dit.eval.convert_inception", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pth", type=Path, required=True, help="pytorch-fid's pt_inception-*.pth")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    try:
        digest = convert(args.pth, args.out)
    except UserError as error:
        return report(error)
    print(f"wrote {args.out} from {args.pth} (sha256 {digest[:16]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
