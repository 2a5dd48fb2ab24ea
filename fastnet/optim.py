"""Optimizers and learning-rate schedules.

An optimizer owns one set of state arrays per parameter (velocity for the momentum methods, first
and second moments for Adam) and applies one backend kernel per parameter and step. The state is
plain arrays in `state`, so a checkpoint saves and restores it as it is.

Every update rule is described once, in UPDATE_RULES, and every rule's kernel takes its arguments
in one order (see numpy_backend.py):

    <kernel>(param, grad, *state, lr, *hyperparameters, weight_decay, [step,] param16=None)

with `step`, counted from 1, only for the rules that correct their moments' bias (Adam's).
"""

import dataclasses
import math

import numpy as np

from fastnet import backends, settings


@dataclasses.dataclass(frozen=True)
class UpdateRule:
    kernel: str                  # the backend kernel that applies one step to one parameter
    state: tuple = ()            # the names of its per-parameter state arrays, in the kernel's order
    hyperparameters: tuple = ()  # the Optimizer attributes it takes after lr, in the kernel's order
    counts_steps: bool = False   # it takes the step count (Adam's bias correction)


UPDATE_RULES = {
    "sgd": UpdateRule("sgd_step"),
    "momentum": UpdateRule("momentum_step", ("velocity",), ("momentum",)),
    "nesterov": UpdateRule("nesterov_step", ("velocity",), ("momentum",)),
    "adam": UpdateRule("adam_step", ("m", "v"), ("beta1", "beta2", "eps"), counts_steps=True),
    "adamw": UpdateRule("adamw_step", ("m", "v"), ("beta1", "beta2", "eps"), counts_steps=True),
}
OPTIMIZERS = tuple(UPDATE_RULES)
SCHEDULES = ("constant", "step", "cosine", "onecycle")


def check_optimizer(kind="nesterov", momentum=0.9, weight_decay=0.0):
    """The rules of an Optimizer's settings, for Optimizer and for TrainConfig.check."""
    settings.one_of("optimizer", kind, OPTIMIZERS)
    settings.fraction("momentum", momentum, 0.9)
    settings.not_negative("weight_decay", weight_decay, "pass 0 for none")


def check_schedule(kind="onecycle", lr=0.05, warmup=None):
    """The rules of a Schedule's settings, for Schedule and for TrainConfig.check."""
    settings.one_of("schedule", kind, SCHEDULES)
    settings.positive_number("lr", lr, 0.05)
    if warmup is not None:
        settings.fraction("warmup", warmup, 0.1, what="is a fraction of the run in [0, 1)")


class Optimizer:
    """Updates parameters in place from their gradients.

    Weight decay applies to weight matrices only: decaying biases buys nothing and only pulls them
    towards zero. For sgd, momentum, nesterov and adam it is L2 added to the gradient; for adamw it
    is decoupled, shrinking the weights directly.

    copies: per parameter, None or a bfloat16 copy (uint16, MLP.param_copies) that each step rewrites
    from the updated parameter, in the same pass.
    """

    def __init__(self, params, kind="nesterov", momentum=0.9, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, backend=None, copies=None):
        check_optimizer(kind, momentum, weight_decay)
        self.kind = kind
        self.params = params
        self.copies = list(copies) if copies is not None else [None] * len(params)
        if len(self.copies) != len(params):
            raise ValueError(f"copies must list one entry per parameter ({len(params)}), got {len(self.copies)}")
        self.momentum = float(momentum)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.kernels = backends.get(backend)
        self.steps_taken = 0
        self.rule = UPDATE_RULES[kind]
        self.state = {name: [np.zeros_like(p) for p in params] for name in self.rule.state}

    def decay_for(self, param):
        return self.weight_decay if param.ndim > 1 else 0.0

    def step(self, grads, lr):
        """One update of every parameter with learning rate lr."""
        self.steps_taken += 1
        rule = self.rule
        update = getattr(self.kernels, rule.kernel)
        hyperparameters = tuple(getattr(self, name) for name in rule.hyperparameters)
        step = (self.steps_taken,) if rule.counts_steps else ()
        for i, (param, grad, copy) in enumerate(zip(self.params, grads, self.copies, strict=True)):
            state = (self.state[name][i] for name in rule.state)
            update(param, grad, *state, float(lr), *hyperparameters, self.decay_for(param), *step, copy)

    def state_arrays(self):
        """The state as a flat {name: array} mapping, for checkpoints."""
        arrays = {f"optim_{name}_{i}": a for name, group in self.state.items()
                  for i, a in enumerate(group)}
        arrays["optim_steps_taken"] = np.array(self.steps_taken, np.int64)
        return arrays

    def load_state_arrays(self, arrays):
        """Restore what state_arrays() returned, into the existing arrays."""
        for name, group in self.state.items():
            for i, a in enumerate(group):
                a[...] = arrays[f"optim_{name}_{i}"]
        self.steps_taken = int(arrays["optim_steps_taken"])


class Schedule:
    """The learning rate at each step of a run of `total_steps` steps.

    constant: lr throughout.
    step:     lr, then lr/10 after half the steps and lr/100 after three quarters.
    cosine:   from lr down to 0 along half a cosine.
    onecycle: up from lr/25 to lr over the first `warmup` fraction of the steps (0.3 unless given),
              then down along half a cosine to lr/25/1e4, as in Smith's one-cycle policy.
    Any schedule but onecycle also ramps up linearly from 0 when `warmup` is above 0.
    """

    def __init__(self, kind, lr, total_steps, warmup=None):
        check_schedule(kind, lr, warmup)
        self.kind = kind
        self.lr = float(lr)
        self.total_steps = max(int(total_steps), 1)
        if warmup is None:
            warmup = 0.3 if kind == "onecycle" else 0.0
        self.warmup_steps = int(round(float(warmup) * self.total_steps))

    def __call__(self, step):
        """The learning rate for step `step`, counted from 0, as a Python float."""
        lr, total, warm = self.lr, self.total_steps, self.warmup_steps
        if self.kind == "onecycle":
            start, end = lr / 25, lr / 25 / 1e4
            if step < warm:
                return start + (lr - start) * step / warm
            return end + (lr - end) * _half_cosine((step - warm) / max(total - warm, 1))
        if step < warm:
            return lr * (step + 1) / warm
        progress = (step - warm) / max(total - warm, 1)
        if self.kind == "constant":
            return lr
        if self.kind == "step":
            return lr * (0.1 ** ((progress >= 0.5) + (progress >= 0.75)))
        return lr * _half_cosine(progress)


def _half_cosine(progress):
    """1 at progress 0, falling along half a cosine to 0 at progress 1."""
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
