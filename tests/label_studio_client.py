"""The annotator's side of the Label Studio round trip (tests/test_label_studio.py's slow test).

Run by the interpreter of Label Studio's own environment (``make label-studio``: label-studio and
label-studio-sdk pin their own dependencies, kept out of visiontune's): through label-studio-sdk it
creates a project with visiontune's labelling config, imports visiontune's tasks, accepts each
pre-annotation as the annotation (the first one corrected to the other class, as a person would),
and downloads the project's JSON export. Prints a JSON summary on its last line.

  python label_studio_client.py URL TOKEN tasks.json tasks.xml export.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(url: str, token: str, tasks_file: str, config_file: str, out: str) -> None:
    # imported here: pytest's doctest collection imports this file with visiontune's interpreter
    from label_studio_sdk import LabelStudio

    client = LabelStudio(base_url=url, api_key=token)
    config = Path(config_file).read_text()
    project = client.projects.create(title="visiontune round trip", label_config=config)
    tasks = json.loads(Path(tasks_file).read_text())
    client.projects.import_tasks(id=project.id, request=tasks)
    imported = list(client.tasks.list(project=project.id, fields="all"))
    choices = [c.split('"')[1] for c in config.split("<Choice ")[1:]]
    corrected = None
    for task in sorted(imported, key=lambda t: t.id):
        predictions = task.predictions or []
        if not predictions:
            continue  # an image the model answered "unknown" for: left for a person
        result = json.loads(json.dumps(predictions[0].result if hasattr(predictions[0], "result")
                                       else predictions[0]["result"]))
        if corrected is None:  # the annotator disagrees with the model once
            given = result[0]["value"]["choices"][0]
            result[0]["value"]["choices"] = [next(c for c in choices if c != given)]
            corrected = {"image": task.data["image"], "label": result[0]["value"]["choices"][0]}
        client.annotations.create(id=task.id, result=result, was_cancelled=False)
    export = b"".join(client.projects.exports.download_sync(id=project.id, export_type="JSON",
                                                                download_all_tasks=True))
    Path(out).write_bytes(export)
    print(json.dumps({"project": project.id, "imported": len(imported), "corrected": corrected,
                      "annotated": sum(bool(t.get("annotations")) for t in json.loads(export))}))


if __name__ == "__main__":
    main(*sys.argv[1:6])
