"""The model that tune.py searches over: a plain multi-layer perceptron.

    python mlp.py        # prints the default model and its parameter count

MLP(in_size, hidden_size, out_size, layer_size, dropout) stacks `layer_size` hidden blocks of
Linear -> ReLU -> Dropout, each `hidden_size` wide, then one Linear to `out_size` logits.
No softmax at the end: F.cross_entropy wants raw logits, and argmax does not need probabilities.
"""
import torch.nn as nn


class MLP(nn.Module):
    def __init__(self, in_size=784, hidden_size=128, out_size=10, layer_size=5, dropout=0.2):
        super().__init__()
        blocks = []
        width = in_size
        for _ in range(layer_size):
            blocks += [nn.Linear(width, hidden_size), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden_size
        blocks.append(nn.Linear(width, out_size))
        self.layers = nn.Sequential(*blocks)

    def forward(self, x):
        return self.layers(x)


if __name__ == "__main__":
    model = MLP()
    print(model)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
