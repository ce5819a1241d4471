"""SLURM host lists and their hosts: expanded by megamobi.launcher (tests/launch) and checked against
`scontrol show hostnames` where SLURM is installed (tests/slurm)."""

# SLURM's host-list grammar; the same table is checked against `scontrol show hostnames` in tests/slurm.
HOSTLISTS = [
    ("node1", ["node1"]),
    ("gpu[001-003]", ["gpu001", "gpu002", "gpu003"]),
    ("gpu[08-10,15],login7", ["gpu08", "gpu09", "gpu10", "gpu15", "login7"]),
    ("a[1-2],b[3],c", ["a1", "a2", "b3", "c"]),
    ("node-[1-2]-ib", ["node-1-ib", "node-2-ib"]),  # text after the brackets (issue 14: was '1-2]-ib')
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),  # several bracket groups
    ("x[8-10]", ["x8", "x9", "x10"]),  # no padding: the width of the first number
    ("x[098-101]", ["x098", "x099", "x100", "x101"]),  # zero padding kept, overflowing naturally
    ("gpu-a[001-002],gpu-b[10,12]", ["gpu-a001", "gpu-a002", "gpu-b10", "gpu-b12"]),
    ("h1,h3,h2", ["h1", "h3", "h2"]),  # a plain list keeps SLURM's order
]
