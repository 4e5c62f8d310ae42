"""The FPN head: every level reaches the finest map, on plain and dilated backbones, with either classifier."""

import pytest
import torch

from models.heads import FPNHead

CHANNELS = [64, 128, 256, 512]


@pytest.mark.parametrize('offset_learning', [False, True])
@pytest.mark.parametrize('sizes', [[32, 16, 8, 4], [32, 16, 8, 8], [32, 16, 16, 16]])  # output stride 32 / 16 / 8
def test_logits_at_the_finest_map_for_any_output_stride(sizes, offset_learning):
    head = FPNHead(CHANNELS, num_classes=5, offset_learning=offset_learning).eval()
    features = [torch.randn(2, c, s, s + s // 2) for c, s in zip(CHANNELS, sizes)]
    assert head(features).shape == (2, 5, 32, 48)
    assert [len(steps) for steps in head.scale_heads] == [1, 1, 2, 3]


def test_as_large_as_segmentation_models_pytorch_fpn_on_resnet18():
    """The same design as SMP's FPN decoder (256-channel pyramid, 128-channel branches, summed), BN for GN."""
    smp = pytest.importorskip('segmentation_models_pytorch')
    ours = FPNHead(CHANNELS, num_classes=11)
    peer = smp.FPN(encoder_name='resnet18', encoder_weights=None, classes=11)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(ours) == count(peer.decoder) + count(peer.segmentation_head)
