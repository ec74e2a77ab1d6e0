"""The machine a run records: the CPU model and ISA flags read from a fabricated /proc/cpuinfo, and the text
naming what differs between two machines."""

from dilaff_jax.process import machine

INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni sha_ni

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu
"""
AMD = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx fma avx2 sha_ni\n"


def test_describe_reads_the_first_processors_model_and_isa_flags_in_a_fixed_order(tmp_path):
  (tmp_path / "intel").write_text(INTEL)
  (tmp_path / "amd").write_text(AMD)
  intel = machine.describe(str(tmp_path / "intel"))
  assert intel["cpu"] == "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"
  assert intel["isa"] == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"]
  amd = machine.describe(str(tmp_path / "amd"))
  assert (amd["cpu"], amd["isa"]) == ("AMD EPYC", ["sse4_2", "avx", "avx2", "fma"])
  assert machine.describe(str(tmp_path / "missing"))["isa"] == []  # unreadable: still a description, no error
  assert machine.difference(intel, amd) == (
      "cpu Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz -> AMD EPYC, "
      "isa sse4_2+avx+avx2+fma+avx512f+avx512bw+avx512vl+avx512_vnni -> sse4_2+avx+avx2+fma"
  )
  assert machine.difference(amd, dict(amd)) == ""
  assert machine.difference({}, amd) == ""  # a run recorded before machines were: nothing to compare
  assert machine.difference({**amd, "jaxlib": "0.1"}, amd) == f"jaxlib 0.1 -> {amd['jaxlib']}"
