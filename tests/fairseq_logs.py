"""Reading fairseq's training logs in tests."""
from typing import Dict, List


def log_records(log: str, kind: str) -> List[Dict[str, str]]:
    """The `key value` fields of each `train` or `valid` record of a simple-format fairseq log."""
    records = []
    for line in log.splitlines():
        parts = [part.strip() for part in line.split(" | ")]
        if len(parts) > 3 and parts[1] == "INFO" and parts[2] == kind:
            pairs = [part.split(" ", 1) for part in parts[3:]]
            records.append({pair[0]: pair[1] for pair in pairs if len(pair) == 2})
    return records
