"""Precision `auto`: bf16 only where the processor runs it natively."""

from llava_lite.cpu_features import cpu_flags
from llava_lite.train.precision import resolve_precision

X86_NO_BF16 = ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n\n"
               "processor\t: 1\nflags\t\t: fpu\n")
X86_AMX = "processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n"
ARM_BF16 = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_cpu_flags_reads_x86_and_arm(tmp_path):
    for text, flag in ((X86_NO_BF16, "avx512f"), (X86_AMX, "amx_bf16"), (ARM_BF16, "bf16")):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        assert flag in cpu_flags(path)
    assert cpu_flags(tmp_path / "missing") == set()


def test_auto_picks_bf16_only_with_native_support(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(X86_NO_BF16)
    precision, why = resolve_precision("auto", cuda=False, flags=cpu_flags(path))
    assert precision == "fp32" and "emulated" in why
    path.write_text(X86_AMX)
    precision, why = resolve_precision("auto", cuda=False, flags=cpu_flags(path))
    assert precision == "bf16" and "amx_bf16" in why and "avx512_bf16" in why
    assert resolve_precision("auto", cuda=False, flags={"bf16", "asimd"})[0] == "bf16"


def test_an_explicit_precision_is_kept():
    for p in ("fp32", "bf16", "fp16"):
        assert resolve_precision(p, cuda=False, flags={"amx_bf16"}) == (p, "set by the recipe")


def test_native_int8_reads_the_vnni_and_amx_flags():
    from llava_lite.cpu_features import native_int8

    assert native_int8({"fpu", "avx512f", "avx512_vnni", "amx_int8"}) == ["avx512_vnni"]
    assert native_int8({"fpu", "avx2", "avx_vnni"}) == []  # torch's int8 matmul is a scalar loop there
