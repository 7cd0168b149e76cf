"""The pickle globals picklescan and modelscan flag in each FILE, as JSON (tests/scan.rs compares
sanctum's findings with theirs): {"FILE": {"picklescan": [[module, name], ...], "modelscan": [...]}}.

    python peers.py FILE...
"""

import json
import sys

from modelscan.modelscan import ModelScan
from picklescan.scanner import SafetyLevel, scan_file_path

flagged = {}
for path in sys.argv[1:]:
    picklescan = scan_file_path(path)
    modelscan = ModelScan().scan(path)
    flagged[path] = {
        "picklescan": sorted({(g.module, g.name) for g in picklescan.globals if g.safety == SafetyLevel.Dangerous}),
        "modelscan": sorted({(i["module"], i["operator"]) for i in modelscan["issues"]}),
    }
json.dump(flagged, sys.stdout, indent=1)
