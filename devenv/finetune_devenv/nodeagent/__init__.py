"""A development node agent: plays the kubelet and the scheduler for the local control plane.

The local control plane (:mod:`finetune_devenv.cluster`) has no kubelet and no scheduler, so pods
stay Pending. This agent registers one Node, binds pending pods to it, and runs each container as a
local process exactly as the pod spec says (command, args, env, volumes materialised on disk), then
reports pod status the way a kubelet does. There is no container runtime: images are not pulled and
processes share this machine's filesystem, network and GPUs. Development only; nothing here ships.

Modules, pure first:

- :mod:`.env` and :mod:`.volumes` and :mod:`.pods`: pod spec to :class:`~.pods.PodPlan` (argv, env,
  files to write, dev-only path rewrites), no I/O, table-tested.
- :mod:`.status` and :mod:`.scheduling`: the pod status a kubelet would write; whether a pod fits.
- :mod:`.hostsfile`: the marked block of pod host names in ``/etc/hosts``.
- :mod:`.runner`: processes (one session per container, every descendant tagged for clean-up).
- :mod:`.kube`: the API calls. :mod:`.kubelet`: one pod's sync (bind, start, status, stop, delete).
- :mod:`.agent`: Node registration, heartbeat, pod watch and the loop. :mod:`.cli`: ``run|up|down|logs``.

See docs/node-agent.md.
"""
