"""Schedule: rules combined, later rules win over earlier ones."""

from __future__ import annotations

from tests.conftest import encoder_layer as layer

import layerfreeze as lf


def test_schedule_freeze_windows_and_later_rules_win(encoder) -> None:
    m = encoder
    s = (
        lf.Schedule()
        .freeze("encoder", from_epoch=1, until_epoch=3, mode="eval")
        .freeze("encoder.layer[0]", from_step=10, until_step=None, mode="norm")
        .freeze("encoder.layer[3]", until_epoch=2)
    )
    assert s.frozen_at(m, epoch=0) == layer(3)
    assert s.frozen_at(m, epoch=1) == lf.select(m, "encoder")
    assert s.frozen_at(m, epoch=2) == layer(0) + layer(1) + layer(2)  # until is exclusive; rule 2 wins
    assert s.frozen_at(m, epoch=3, step=10) == layer(0)
    assert s.frozen_at(m, epoch=3, step=3) == []
