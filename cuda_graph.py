"""The whole training step as one CUDA graph: recorded once per trial, then replayed at every step.

    step = CapturedStep(lambda x, y: sgd_step(model, optimizer, x, y, loss_sum), optimizer)
    step(x, y)            # copies the batch into the graph's own input tensors and replays

Why: a small model's step on a GPU is some 60-80 tiny kernels (forward, backward, SGD), each
launched from Python: at batch 32 the GPU waits for the CPU most of the time. A graph is those
kernels recorded once; a replay launches all of them with one call. Opt-in (train(cuda_graph=True),
tune.py --cuda-graph) until benchmarks/gpu_check.sh, which compares both ways, has run on a GPU.

What a captured step may not do, since a replay repeats exactly the recorded kernels:
  - read a value on the host (.item(), print, `if loss > x`): the loss is summed on the device;
  - allocate new tensors between replays: inputs and outputs keep their addresses, so each batch
    is copied into `self.x`, `self.y`, and every batch has the same shape (train() runs an
    epoch's last, smaller batch eagerly);
  - take Python numbers that change: the learning rate is read from a tensor at replay time.
Random numbers (dropout) are fine: PyTorch's CUDA generator hands each replay fresh ones and
advances its state as an eager step would, so torch.cuda.get_rng_state() stays true for checkpoints.

Used by train_loop.py on CUDA devices when asked; CPU and MPS keep the eager loop. Imports only torch.
"""
import functools

import torch

WARMUP_STEPS = 3  # eager steps first, on a side stream, as PyTorch's docs advise: they create the
                  # optimizer's momentum buffers and cuBLAS's workspaces, which a capture cannot


class CapturedStep:
    """`step(x, y)`, which runs forward, backward and `optimizer.step()` with no host reads,
    run eagerly for WARMUP_STEPS calls, then captured and replayed. Same results as eager calls."""

    def __init__(self, step, optimizer):
        self.step, self.optimizer = step, optimizer
        self.graph, self.x, self.y, self.lr = None, None, None, None
        self.calls = 0

    def __call__(self, x, y):
        self.calls += 1
        if self.calls <= WARMUP_STEPS:
            return self.warm_up(x, y)
        if self.graph is None:
            self.capture(x, y)
        self.x.copy_(x)
        self.y.copy_(y)
        for group in self.optimizer.param_groups:  # the schedule's latest rate, for this replay
            self.lr.fill_(group["lr"])
        self.graph.replay()

    def warm_up(self, x, y):
        side = side_stream(x.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.optimizer.zero_grad(set_to_none=True)
            self.step(x, y)
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, x, y):
        """Record one step (nothing runs yet). Gradients are None before it, so backward makes them
        inside the graph's own memory, where every replay writes them again (no zero_grad needed)."""
        self.x, self.y = x.clone(), y.clone()
        self.lr = torch.zeros((), device=x.device)
        self.optimizer.zero_grad(set_to_none=True)
        rates = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:  # fused SGD reads a tensor rate from device memory;
            group["lr"] = self.lr                   # the schedule keeps stepping the plain numbers
        try:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=side_stream(x.device)):
                self.step(self.x, self.y)
        finally:
            for group, rate in zip(self.optimizer.param_groups, rates):
                group["lr"] = rate

    def close(self):
        """Free the graph and its memory pool now (not at the next garbage collection): a study runs
        many trials in one process, and each trial's graph holds its activations and gradients."""
        self.optimizer.zero_grad(set_to_none=True)  # the gradients live in the graph's pool
        self.graph = self.x = self.y = None


@functools.cache
def side_stream(device):
    """The stream for warm-ups and captures, one per device for the whole process: the warm-up
    prepares what the capture then uses (cuBLAS keeps a workspace per stream, so a new stream per
    trial would also hold a new workspace of GPU memory per trial)."""
    return torch.cuda.Stream(device)
