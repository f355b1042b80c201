"""What the lab knows of each building block, in one descriptor per block: how it is built, what it costs
in memory, how Trainer names it or why it has none, what it combines with, the package it needs and the
loss it is held to. The predictors, the engines, the worker, validation and the report ask the
descriptor; none matches a block's name.

Modules: parts (what descriptors are made of), optimizers, adapters. Importing any of them imports no
torch (the report reads the loss rules): libraries are imported inside the functions that build.
"""
