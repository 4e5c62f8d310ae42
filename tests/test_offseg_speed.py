"""benchmarks/offseg_speed.py: every speed-up it times leaves the outputs as they were."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / 'benchmarks'))
import offseg_speed  # noqa: E402


def test_each_change_and_the_whole_model_keep_their_outputs():
    rows = offseg_speed.main(['--sizes', '64', '--runs', '1', '--warmup', '0'])
    assert [row['change'] for row in rows] == [
        'attention bias',
        'attention logits',
        'attention in query blocks',
        'attention channel-major',
        'upsampling channels_last',
        'stem channels_last',
        'similarity norm',
        'CARAFE in channel blocks',
        'Offset Learning, K=150',
        'Offset Learning, K=11',
        'OffSeg-T',
    ]
    assert rows[0]['diff'] == 0  # the cached bias is the recomputed one, bit for bit
    assert all(row['diff'] < 1e-4 and row['before'] > 0 and row['after'] > 0 for row in rows)
    assert rows[-1]['segformer_b0'] > 0 and rows[-1]['ms_per_gmac'] > 0
