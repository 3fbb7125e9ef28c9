"""Train a head on cached features: extract layer3 once, then train layer4 + fc with fxtap.cut.

`fxtap extract --pool none` writes the layer3 feature maps of the images; `fxtap.cut(model,
["layer3"])` runs layer4, avgpool and fc from them. In eval mode, on the same batches, its losses
and the gradients of layer4 and fc equal those of the full model with layers 1-3 frozen.
"""

import copy
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torchvision
import torchvision.transforms.v2 as T
from PIL import Image

import fxtap

torch.manual_seed(0)
model = torchvision.models.resnet18(weights=None).eval()
folder = Path(tempfile.mkdtemp())
torch.save(model.state_dict(), folder / "weights.pt")
subprocess.run(
    [sys.executable, "-m", "fxtap", "extract", "resnet18", "layer3", "--data", "examples/images", "-o", str(folder / "features"),
     "--image-size", "64", "--pool", "none", "--weights", str(folder / "weights.pt"), "--quiet"],
    check=True,
)  # fmt: skip
features = fxtap.load_features(folder / "features")
layer3 = features.tensors["layer3"]  # (6, 256, 4, 4): one row per image, in features.files order
labels = torch.randint(0, 1000, (len(layer3),))

# the same images as the full model sees them: the CLI's resnet18 preprocessing at 64 pixels
crop = T.Compose([T.Resize(73), T.CenterCrop(64), T.PILToTensor()])
pixels = torch.stack([crop(Image.open(Path("examples/images") / f).convert("RGB")) for f in features.files])
images = (pixels.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
assert torch.equal(fxtap.tap(model, ["layer3"])(images)["layer3"], layer3)  # the cached features are the model's

full = copy.deepcopy(model)  # trained end to end, with the stem and layers 1-3 frozen
for name, parameter in full.named_parameters():
    parameter.requires_grad_(name.startswith(("layer4", "fc")))
head = fxtap.cut(model, ["layer3"])  # layer4 + avgpool + fc, sharing model's parameters
trained = [p for n, p in model.named_parameters() if n.startswith(("layer4", "fc"))]
optimizers = [torch.optim.SGD(trained, lr=0.01), torch.optim.SGD([p for p in full.parameters() if p.requires_grad], lr=0.01)]
loss_fn = torch.nn.CrossEntropyLoss()
for step in range(3):
    losses = [loss_fn(head(layer3)["output"], labels), loss_fn(full(images), labels)]
    for optimizer, loss in zip(optimizers, losses):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    grads_equal = all(torch.equal(model.get_parameter(n).grad, p.grad) for n, p in full.named_parameters() if p.requires_grad)
    print(f"step {step}: cut loss {losses[0].item():.6f}, full loss {losses[1].item():.6f}, "
          f"losses equal: {torch.equal(losses[0], losses[1])}, layer4 and fc gradients equal: {grads_equal}")  # fmt: skip
