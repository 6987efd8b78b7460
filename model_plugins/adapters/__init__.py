"""Framework adapters: serve an exported model with no Python from the user.

Each adapter is a :class:`~model_plugins.plugin.ModelPlugin` named in a pipeline by its
built-in name (``registry.BUILTINS``):

* ``torchscript``: a TorchScript file (``torchscript.TorchScriptAdapter``);
* ``torch``: an ``nn.Module`` from a factory function, with an optional state_dict
  (``torch_module.TorchModuleAdapter``);
* ``tensorflow``: a SavedModel signature (``tensorflow.SavedModelAdapter``);
* ``paddle``: a Paddle inference model (``paddle.PaddleInferenceAdapter``).

A node wires the model's inputs by name and may declare its outputs::

    encoder:
      plugin: torchscript
      model: models/encoder.pt
      inputs: {x: $inputs.x}
      outputs: {y: {dtype: float32, shape: [4]}}
      params: {output_names: [y]}

The modules import their framework inside ``load`` and ``predict`` only, so the front process
can read an adapter's declarations without importing the framework.  The TensorFlow and Paddle
adapters read the model's input (and output) specs when they load it and report them as
``loaded_inputs`` / ``loaded_outputs``.
"""
