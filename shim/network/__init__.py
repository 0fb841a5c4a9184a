"""Host-side sandbox networking: CNI client, named netns, TAP + tc mirred plumbing.

    plan.py        which network a sandbox gets, from its OCI spec (pure)
    cni.py         run a CNI plugin chain (ADD/CHECK/DEL, cached results, host-wide lock)
    netns.py       create/delete named netns under /run/netns, run code inside one
    tap.py         open a TAP in a netns and wire it to a veth with tc mirred ("tcfilter")
    plumbing.py    discover a netns' interfaces and plumb each one to a TAP for QEMU
    host.py        HostNetworks: one sandbox's host side (netns + CNI + TAPs), set up / torn down
    attachment.py  NetworkAttachment: what the sandbox (shim.sandbox) drives across the VM's
                   life -- decide, prepare, plan (NICs + guest config), release; and the state
                   releaser of "network" records

The network never touches the VM or the agent: the sandbox hot-plugs the planned NICs and
sends the planned guest configuration itself.
"""
