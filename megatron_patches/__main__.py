"""python -m megatron_patches: list the patches, whether this machine needs them, and any drift."""

from . import PATCHES, have_cuda, have_transformer_engine, megatron_core_version, wanted


def main():
    cuda, te = have_cuda(), have_transformer_engine() and have_cuda()
    print(f"megatron-core {megatron_core_version()}; CUDA {'yes' if cuda else 'no'}; "
          f"TransformerEngine {'yes' if te else 'no'}")
    for p in PATCHES:
        drift = p.drift()
        state = "needed" if wanted(p, cuda, te) else "not needed"
        print(f"- {p.name} [{p.when}, {state}{', DRIFT' if drift else ''}]: {p.summary}\n    why: {p.why}")
        for d in drift:
            print(f"    drift: {d}")


if __name__ == "__main__":
    main()
