"""Write the seed cases of the regression corpus (tests/fuzz/corpus/): hand-made damage
that each fuzzer should also find, with the reader outcome each must get. Run once:

    python -m tests.fuzz.make_corpus

File names are ``<base>--<what>--<reader outcome>.bin``; the fuzzers add
``<base>--found-...bin`` files (no expected outcome: only the properties are replayed).
"""

from __future__ import annotations

import random
from pathlib import Path

from tests.fuzz.journals import BASES, _record_bounds
from walstore import _journal_format as fmt

CORPUS = Path(__file__).with_name("corpus")


def seeds() -> dict[str, bytes]:
    fresh, inline = BASES["fresh"].data, BASES["inline"].data
    later, staged = BASES["later"].data, BASES["staged"].data
    rec = _record_bounds(inline)  # header, checkpoint, commits 2..
    salt = BASES["inline"].scan.header.salt
    last_lsn = BASES["inline"].scan.commits[-1].lsn

    def flip(d: bytes, pos: int) -> bytes:
        return d[:pos] + bytes([d[pos] ^ 0x10]) + d[pos + 1 :]

    s3, e3 = rec[4]
    bad_kind = fmt._GROUP.pack(last_lsn + 1, 1) + fmt._TX.pack(999, 1) + fmt._OP.pack(9, 1) + b"x"
    wrong_first = fmt.encode_header(fmt.SegmentHeader(7, salt))
    skip = fmt.encode_commit(fmt.Commit(last_lsn + 2, (fmt.TxRecord(999, (fmt.Delete("f0"),)),)))
    return {
        "fresh--torn-header--torn-segment": fresh[:5],
        "fresh--torn-checkpoint--torn-segment": fresh[:40],
        "inline--damaged-header-long-segment--refused": flip(inline, 3),
        "inline--bad-crc-mid-then-valid--refused": flip(inline, s3 + 30),
        "inline--zero-tail--full": inline + bytes(4096),
        "inline--zeroed-record-mid--refused": inline[:s3] + bytes(e3 - s3) + inline[e3:],
        "inline--garbage-tail--full": inline + random.Random(3).randbytes(300),
        "inline--torn-last-record--prefix": inline[:-10],
        "inline--dropped-record--refused": inline[:s3] + inline[e3:],
        "inline--duplicated-record--refused": inline[:e3] + inline[s3:e3] + inline[e3:],
        "inline--swapped-records--refused": (
            inline[: rec[3][0]] + inline[s3:e3] + inline[rec[3][0] : s3] + inline[e3:]
        ),
        "inline--foreign-record-tail--full": inline + later[_record_bounds(later)[2][0] :],
        "inline--huge-length-tail--full": inline + fmt._HEAD.pack(2**31 - 1, 0, 3) + b"abc",
        "inline--torn-append--full": inline + inline[s3 : s3 + 20],
        "inline--valid-crc-bad-payload-tail--refused": inline
        + fmt.encode_record(fmt.RecordType.COMMIT, bad_kind, salt),
        "inline--checkpoint-lsn-mismatch--refused": wrong_first + inline[rec[0][1] :],
        "inline--lsn-gap-valid-crc--refused": inline
        + fmt.encode_record(fmt.RecordType.COMMIT, skip, salt),
        "later--cut-after-checkpoint--prefix": later[: _record_bounds(later)[1][1]],
        "staged--bad-crc-last-record--prefix": flip(staged, len(staged) - 5),
    }


if __name__ == "__main__":
    CORPUS.mkdir(exist_ok=True)
    for name, data in seeds().items():
        (CORPUS / f"{name}.bin").write_bytes(data)
