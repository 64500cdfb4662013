"""The whole training step as one CUDA graph: recorded once per trial, then replayed at every step.

    step = CapturedStep(sgd_step, optimizer, device)   # sgd_step(x, y): zero_grad, forward, backward, step
    step(x, y)            # warm-up, capture, then: copy the batch into the graph's inputs and replay

Why: a small model's step on a GPU is some 60-80 tiny kernels (forward, backward, SGD), each
launched from Python: at batch 32 the GPU waits for the CPU most of the time. A graph is those
kernels recorded once; a replay launches all of them with one call. Opt-in (train(cuda_graph=True),
--cuda-graph) until benchmarks/gpu_check.sh, which compares both ways, has run on a GPU.

What a captured step may not do, since a replay repeats exactly the recorded kernels:
  - read a value on the host (.item(), print, `if loss > x`): the loss is summed on the device;
  - allocate new tensors between replays: each batch is copied into the graph's own input tensors;
    a batch of another shape (an epoch's last, smaller one) runs eagerly instead;
  - take Python numbers that change: the learning rate is read from a tensor at replay time.

What is promised. Fused SGD reads a tensor learning rate as float32 and a Python number as float64.
So every step of a captured run, warm-ups and eager last batches included, takes its rate from the
same float32 tensor: a captured run is bit-identical to its own rerun and to itself resumed from a
checkpoint (whose first steps are eager warm-ups where the uninterrupted run replayed). Against an
eager run (float64 rates) it agrees to float32 rounding, which grows over a run: tests/test_gpu.py
checks weights within a tolerance and accuracies within 0.2 points. Random numbers (dropout) come
from the device's generator, which each replay advances as an eager step would: the generator's
state after N steps is the same either way, and checkpoints stay true.

Used by train_loop.py on CUDA devices when asked; CPU and MPS keep the eager loop. Imports only torch.
"""
import contextlib
import functools

import torch

WARMUP_STEPS = 3  # eager steps first, on a side stream, as PyTorch's docs advise: they create the
                  # optimizer's momentum buffers and cuBLAS's workspaces, which a capture cannot


class CapturedStep:
    """`step(x, y)`, which zeroes the gradients, runs forward, backward and `optimizer.step()` with no
    host reads: WARMUP_STEPS calls eagerly, then captured and replayed for batches of the captured shape."""

    def __init__(self, step, optimizer, device):
        self.step, self.optimizer, self.device = step, optimizer, device
        self.graph, self.x, self.y, self.grads, self.calls = None, None, None, None, 0
        self.lr = torch.zeros((), dtype=torch.float32, device=device)  # the rate every step reads

    def __call__(self, x, y):
        self.calls += 1
        # The current device is the one the data are on: streams and synchronisations that name no
        # device (torch.cuda.graph's own) act on the current one, which would be cuda:0 otherwise.
        with torch.cuda.device(self.device), self.rate_from_tensor():
            if self.graph is None and self.calls > WARMUP_STEPS:
                self.capture(x, y)
            if self.graph is not None and x.shape == self.x.shape:
                self.x.copy_(x)
                self.y.copy_(y)
                self.graph.replay()
            elif self.graph is None:  # a warm-up, on the side stream the capture will use
                side, current = side_stream(self.device), torch.cuda.current_stream(self.device)
                side.wait_stream(current)
                with torch.cuda.stream(side):
                    self.step(x, y)
                current.wait_stream(side)
            else:  # another shape after the capture: eagerly, its gradients then copied into the graph's
                self.step(x, y)
                for param, grad in zip(self.params(), self.grads):
                    param.grad = grad.copy_(param.grad)  # so .grad shows the latest step, replayed or not

    @contextlib.contextmanager
    def rate_from_tensor(self):
        """During a step, each parameter group's rate is self.lr, filled with the schedule's latest
        value; outside, the plain number again, for the schedule and the checkpoints."""
        rates = [group["lr"] for group in self.optimizer.param_groups]
        self.lr.fill_(rates[0])
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        try:
            yield
        finally:
            for group, rate in zip(self.optimizer.param_groups, rates):
                group["lr"] = rate

    def capture(self, x, y):
        """Record one step (nothing runs yet). Gradients are None before it, so backward makes them
        inside the graph's own memory, where every replay writes them again."""
        self.x, self.y = x.clone(), y.clone()
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side_stream(self.device)):
            self.step(self.x, self.y)
        self.graph, self.grads = graph, [param.grad for param in self.params()]

    def params(self):
        return [param for group in self.optimizer.param_groups for param in group["params"]]


@functools.cache
def side_stream(device):
    """The stream for warm-ups and captures, one per device for the whole process: the warm-up
    prepares what the capture then uses (cuBLAS keeps a workspace per stream, so a new stream per
    trial would also hold a new workspace of GPU memory per trial)."""
    return torch.cuda.Stream(device)
