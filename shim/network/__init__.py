"""Host-side sandbox networking: CNI client, named netns, TAP + tc mirred plumbing.

    cni.py       run a CNI plugin chain (ADD/CHECK/DEL, cached results, host-wide lock)
    netns.py     create/delete named netns under /run/netns, run code inside one
    tap.py       open a TAP in a netns and wire it to a veth with tc mirred ("tcfilter")
    plumbing.py  discover a netns' interfaces and plumb each one to a TAP for QEMU
    sandbox.py   the shim-facing API: set up / tear down one sandbox's network
"""
