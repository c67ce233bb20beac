"""CPU feature detection: the override names exactly the instruction sets kernels may use."""

from prunekit.runtime import cpu


def test_override_sets_exactly_the_named_features(monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CPU_FEATURES", "avx2,fma")
    cpu.features.cache_clear()
    try:
        f = cpu.features()
        assert f.avx2 and not f.avx512 and not f.vnni and f.vector_floats == 8
        assert "AVX2" in f.describe()
    finally:
        cpu.features.cache_clear()


def test_vnni_needs_avx512_too(monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CPU_FEATURES", "avx2,fma,avx512vnni")
    cpu.features.cache_clear()
    try:
        assert not cpu.features().vnni
        monkeypatch.setenv("PRUNEKIT_CPU_FEATURES", "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")
        cpu.features.cache_clear()
        assert cpu.features().vnni and cpu.features().vector_floats == 16
    finally:
        cpu.features.cache_clear()


def test_the_host_is_read():
    cpu.features.cache_clear()
    f = cpu.features()
    assert f.name and isinstance(f.flags, frozenset)
    assert f.describe().startswith(cpu.cpu_model())
