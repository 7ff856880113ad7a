"""The page of ``umbrella serve``: look at a scan in three planes and ask the model about it.

A Gradio app (the field's choice for model demos) mounted on the server that
also serves the API. A person uploads NIfTI files (with their ``.bval`` /
``.bvec`` / ``.json`` sidecars where the modality reads them) or picks a demo
file; each image is checked and preprocessed as training did, and shown as
the model sees it: axial, coronal and sagittal planes with a slider each, a
frame slider for series, a channel choice for several-channel images (dMRI's
FA and MD). The modality is told from the file name as ``umbrella generate``
tells it, and can be changed. Questions are answered through the
checkpoint's chat template; the conversation is kept until the images
change or it is cleared. Problems with a file are the CLI's one-line errors,
shown on the page.

(Since 0.3.)
"""

from __future__ import annotations

import html
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from umbrella_core.errors import UmbrellaError
from umbrella_core.serve.assistant import Assistant, Image, group_files
from umbrella_core.serve.views import PLANES, volume_of
from umbrella_core.types import Turn

__all__ = ["build_page", "write_demo_files", "THEME_CSS", "EMPTY"]

THEME_CSS = """
#umbrella-status p { margin: 0.25em 0; }
#umbrella-status .error { color: #b91c1c; font-weight: 600; }
"""


def write_demo_files(assistant: Assistant, folder: Path) -> dict[str, list[str]]:
    """One demo subject per label of each of the checkpoint's modalities with a phantom.

    Returns ``{choice label: files}``; the label says what the phantom holds,
    so a person sees whether the model answers it.
    """
    import numpy as np

    from umbrella_core.imaging import save_nifti

    choices: dict[str, list[str]] = {}
    for name, spec in sorted(assistant.specs.items()):
        demo = spec.demo
        if demo is None or demo.phantom is None:
            continue
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        # The phantom at the checkpoint's geometry: what its run read.
        for label in demo.labels:
            paths = []
            for part in demo.phantom(spec, rng, label):
                path = folder / name / f"sub-demo{label}_{part.suffix}.nii.gz"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_nifti(path, part.data, part.affine, tr=part.tr)
                paths.append(str(path))
            files = " + ".join(os.path.basename(p) for p in paths)
            choices[f"{name}: {files} (answer: {label})"] = paths
    return choices


class _Page:
    """What the page's event handlers share: the assistant, the demo files, a scratch folder."""

    def __init__(self, assistant: Assistant, demo: Mapping[str, list[str]], scratch: Path) -> None:
        self.assistant = assistant
        self.demo = dict(demo)
        self.scratch = scratch

    # -- loading -----------------------------------------------------------

    def session_folder(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="session-", dir=self.scratch))

    def message(self, error: BaseException, folder: Path | None) -> str:
        text = str(error)
        if folder is not None:
            text = text.replace(f"{folder}{os.sep}", "")
        return text.replace("give --modality", "choose its modality below")

    def load(
        self, paths: Sequence[str], modality: str | None, folder: Path | None
    ) -> dict[str, Any]:
        """The page's state for ``paths``: the images that read, one line per one that does not.

        An image whose modality the file name does not tell waits in
        ``pending`` (its files and the line) until the user chooses one.
        """
        images: list[Image] = []
        problems: list[str] = []
        pending: list[tuple[list[str], str]] = []
        specs = {**self.assistant.installed, **self.assistant.specs}
        for chosen, files in group_files(paths, specs, modality=modality):
            try:
                images.append(self.assistant.read(files, chosen))
            except UmbrellaError as error:
                if chosen is None:
                    pending.append((files, self.message(error, folder)))
                else:
                    problems.append(self.message(error, folder))
        if not images and not problems and not pending:
            problems.append("no NIfTI file (.nii or .nii.gz) among the files given")
        return {"images": images, "problems": problems, "pending": pending, "folder": folder}

    def upload(self, uploaded: Sequence[Any] | None, modality: str | None) -> dict[str, Any]:
        if not uploaded:
            return dict(EMPTY)
        folder = self.session_folder()
        paths = []
        for item in uploaded:
            source = Path(getattr(item, "name", None) or str(item))
            # Under their own names, side by side: sidecars are found next to their image.
            target = folder / source.name
            shutil.copyfile(source, target)
            paths.append(str(target))
        return self.load(paths, modality, folder)

    # -- views ---------------------------------------------------------------

    def views(
        self, image: Image | None, channel: int, where: Mapping[str, int], frame: int
    ) -> list[Any]:
        if image is None:
            return [None, None, None]
        volume = volume_of(image.tensor, channel)
        return [volume.slice(plane, where[plane], frame) for plane in PLANES]


#: The page's state with nothing loaded.
EMPTY: dict[str, Any] = {"images": [], "problems": [], "pending": [], "folder": None}


def _status(loaded: Mapping[str, Any], extra: Sequence[str] = ()) -> str:
    images = loaded.get("images") or []
    problems = [*loaded.get("problems", ()), *(m for _, m in loaded.get("pending", ())), *extra]
    lines = [f'<p class="error">error: {html.escape(p)}</p>' for p in problems]
    for image in images:
        shape = "×".join(str(n) for n in image.tensor.shape[1:])
        lines.append(f"<p>{html.escape(image.label)} — read as the model reads it: {shape}</p>")
    return "\n".join(lines) or "<p>Upload NIfTI files or pick a demo file.</p>"


def build_page(
    assistant: Assistant, *, demo_folder: Path, scratch: Path, max_new_tokens: int = 64
) -> Any:
    """The Gradio ``Blocks`` of the page."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    page = _Page(assistant, write_demo_files(assistant, demo_folder), scratch)
    handlers = _Handlers(page, max_new_tokens)
    with gr.Blocks(title="UMBRELLA", analytics_enabled=False, delete_cache=(3600, 3600)) as blocks:
        controls = _layout(page, handlers.default_question)
        _connect(controls, handlers)
    return blocks


def _slider_updates(image: Image | None) -> list[Any]:
    """The plane sliders, frame slider and channel choice for ``image`` (off without one)."""
    import gradio as gr

    if image is None:
        return [gr.Slider(maximum=1, value=0, interactive=False) for _ in PLANES] + [
            gr.Slider(maximum=1, value=0, visible=False),
            gr.Radio(choices=["0"], value="0", visible=False),
        ]
    volume = volume_of(image.tensor)
    middle = volume.middle()
    out: list[Any] = [
        gr.Slider(maximum=volume.shape[axis] - 1, value=middle[plane], interactive=True)
        for plane, axis in PLANES.items()
    ]
    out.append(gr.Slider(maximum=max(volume.frames - 1, 1), value=0, visible=volume.frames > 1))
    channels = int(image.tensor.shape[0])
    out.append(gr.Radio(choices=[str(c) for c in range(channels)], value="0", visible=channels > 1))
    return out


class _Handlers:
    """The page's event handlers: Gradio's inputs in, the updates of their outputs back."""

    def __init__(self, page: _Page, max_new_tokens: int) -> None:
        self.page = page
        self.max_new_tokens = max_new_tokens
        self.questions = page.assistant.questions()
        self.default_question = next(iter(self.questions.values()), "")

    def shown(self, loaded: dict[str, Any], selected: int = 0) -> list[Any]:
        """Every output of a newly loaded set of images, showing image ``selected``."""
        import gradio as gr

        images: list[Image] = loaded["images"]
        selected = min(selected, len(images) - 1) if images else 0
        first = images[selected] if images else None
        choices = [(image.label, i) for i, image in enumerate(images)]
        middle = volume_of(first.tensor).middle() if first else {}
        volume_views = self.page.views(first, 0, middle, 0)
        question = self.default_question
        if first:
            question = self.questions.get(first.modality, self.default_question)
        return [
            loaded,
            _status(loaded),
            gr.Dropdown(choices=choices, value=selected if images else None),
            gr.Dropdown(value=first.modality if first else None),
            *volume_views,
            *_slider_updates(first),
            [],  # a new scan, a new conversation
            gr.Textbox(value=question),
        ]

    def on_upload(self, files: Any, _loaded: Any) -> list[Any]:
        return self.shown(self.page.upload(files, None))

    def on_demo(self, choice: str | None, _loaded: Any) -> list[Any]:
        if not choice:
            return self.shown(dict(EMPTY))
        return self.shown(self.page.load(self.page.demo[choice], None, None))

    def on_modality(
        self, modality: str | None, which: int | None, loaded: dict[str, Any]
    ) -> list[Any]:
        images = list(loaded.get("images") or [])
        problems = list(loaded.get("problems") or [])
        pending = list(loaded.get("pending") or [])
        if not modality:
            return self.shown(loaded, which or 0)
        folder = loaded.get("folder")
        if pending:
            # The files whose modality the name did not tell: read as the chosen one.
            selected = len(images)
            for files, _ in pending:
                try:
                    images.append(self.page.assistant.read(files, modality))
                except UmbrellaError as error:
                    problems.append(self.page.message(error, folder))
            return self.shown(
                {**loaded, "images": images, "problems": problems, "pending": []}, selected
            )
        if which is None or which >= len(images):
            return self.shown(loaded)
        try:
            images[which] = self.page.assistant.read(images[which].files, modality)
        except UmbrellaError as error:
            problems.append(self.page.message(error, folder))
        return self.shown({**loaded, "images": images, "problems": problems}, which)

    def on_pick(self, which: int | None, loaded: dict[str, Any]) -> list[Any]:
        import gradio as gr

        images = loaded.get("images") or []
        image = images[which] if which is not None and which < len(images) else None
        where = volume_of(image.tensor).middle() if image is not None else {}
        return [
            gr.Dropdown(value=image.modality if image else None),
            *self.page.views(image, 0, where, 0),
            *_slider_updates(image),
        ]

    def on_view(
        self,
        loaded: dict[str, Any],
        which: int | None,
        channel: str,
        axial: float,
        coronal: float,
        sagittal: float,
        frame: float,
    ) -> list[Any]:
        images = loaded.get("images") or []
        image = images[which] if which is not None and which < len(images) else None
        where = {"axial": int(axial), "coronal": int(coronal), "sagittal": int(sagittal)}
        return self.page.views(image, int(channel or 0), where, int(frame))

    def on_ask(
        self, question: str, history: list[dict[str, Any]], loaded: dict[str, Any]
    ) -> Iterator[list[Any]]:
        import gradio as gr

        question = (question or "").strip()
        images = loaded.get("images") or []
        history = list(history or [])
        if not question:
            yield [history, gr.Textbox(), _status(loaded)]
            return
        turns = [Turn(role=m["role"], content=_plain(m["content"])) for m in history]
        turns.append(Turn(role="user", content=question))
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        try:
            reply = self.page.assistant.reply(images, turns, max_new_tokens=self.max_new_tokens)
            for piece in reply:
                history[-1]["content"] += piece
                yield [history, gr.Textbox(value=""), _status(loaded)]
        except UmbrellaError as error:
            history = history[:-2]
            problem = self.page.message(error, loaded.get("folder"))
            yield [history, gr.Textbox(value=question), _status(loaded, [problem])]
            return
        history[-1]["content"] = history[-1]["content"].strip()
        yield [history, gr.Textbox(value=""), _status(loaded)]


def _layout(page: _Page, default_question: str) -> dict[str, Any]:
    """Make the page's components, in page order, inside the open ``Blocks``; by name."""
    import gradio as gr

    modalities = sorted(page.assistant.specs)
    loaded = gr.State(dict(EMPTY))
    gr.Markdown(
        f"## UMBRELLA — {page.assistant.name}\n"
        f"Modalities: {', '.join(modalities)}. Images are shown as the model reads them "
        "(after its preprocessing), in the neurological convention: the patient's right "
        "on the right."
    )
    with gr.Row():
        with gr.Column(scale=3):
            scan = _scan_controls(page, modalities)
            scan |= _view_controls()
        with gr.Column(scale=2):
            talk = _chat_controls(default_question)
    return {"loaded": loaded, **scan, **talk}


def _scan_controls(page: _Page, modalities: list[str]) -> dict[str, Any]:
    """The scan's sources (upload, demo file) and its image, modality and channel choices."""
    import gradio as gr

    with gr.Row():
        upload = gr.File(
            label="NIfTI files (.nii, .nii.gz; with .bval/.bvec/.json sidecars)",
            file_count="multiple",
            elem_id="umbrella-upload",
        )
        demo = gr.Dropdown(
            choices=list(page.demo),
            value=None,
            label="or a demo file",
            elem_id="umbrella-demo",
        )
    with gr.Row():
        which = gr.Dropdown(choices=[], label="Image", elem_id="umbrella-image")
        modality = gr.Dropdown(choices=modalities, label="Modality", elem_id="umbrella-modality")
        channel = gr.Radio(
            choices=["0"],
            value="0",
            label="Channel",
            visible=False,
            elem_id="umbrella-view-channel",
        )
    return {
        "upload": upload,
        "demo": demo,
        "which": which,
        "modality": modality,
        "channel": channel,
    }


def _view_controls() -> dict[str, Any]:
    """The status lines, the three planes, a slider for each and the frame slider."""
    import gradio as gr

    status = gr.HTML(_status(EMPTY), elem_id="umbrella-status")
    with gr.Row():
        views = [
            gr.Image(
                label=plane.capitalize(),
                interactive=False,
                buttons=["download", "fullscreen"],
                elem_id=f"umbrella-{plane}",
            )
            for plane in PLANES
        ]
    with gr.Row():
        sliders = [
            gr.Slider(
                0,
                1,
                value=0,
                step=1,
                label=f"{plane} slice",
                interactive=False,
                elem_id=f"umbrella-{plane}-slice",
            )
            for plane in PLANES
        ]
    frame = gr.Slider(0, 1, value=0, step=1, label="frame", visible=False, elem_id="umbrella-frame")
    return {"status": status, "views": views, "sliders": sliders, "frame": frame}


def _chat_controls(default_question: str) -> dict[str, Any]:
    """The conversation, the question box and its buttons."""
    import gradio as gr

    chat = gr.Chatbot(label="Conversation", height=420, buttons=["copy"], elem_id="umbrella-chat")
    question = gr.Textbox(
        value=default_question,
        label="Question",
        lines=2,
        elem_id="umbrella-question",
    )
    with gr.Row():
        ask = gr.Button("Ask", variant="primary", elem_id="umbrella-ask")
        clear = gr.Button("New conversation", elem_id="umbrella-clear")
    return {"chat": chat, "question": question, "ask": ask, "clear": clear}


def _connect(c: Mapping[str, Any], handlers: _Handlers) -> None:
    """Wire the components' events to the handlers (inside the open ``Blocks``)."""
    loaded, which, modality = c["loaded"], c["which"], c["modality"]
    chat, question, status = c["chat"], c["question"], c["status"]
    views, sliders, frame, channel = c["views"], c["sliders"], c["frame"], c["channel"]
    outputs = [
        loaded,
        status,
        which,
        modality,
        *views,
        *sliders,
        frame,
        channel,
        chat,
        question,
    ]
    c["upload"].upload(handlers.on_upload, [c["upload"], loaded], outputs)
    c["demo"].input(handlers.on_demo, [c["demo"], loaded], outputs)
    modality.select(handlers.on_modality, [modality, which, loaded], outputs)
    which.input(handlers.on_pick, [which, loaded], [modality, *views, *sliders, frame, channel])
    view_inputs = [loaded, which, channel, *sliders, frame]
    for control in (*sliders, frame, channel):
        control.change(
            handlers.on_view, view_inputs, views, trigger_mode="always_last", show_progress="hidden"
        )
    asked = [question, chat, loaded]
    c["ask"].click(handlers.on_ask, asked, [chat, question, status])
    question.submit(handlers.on_ask, asked, [chat, question, status])
    c["clear"].click(lambda: [], None, chat)


def _plain(content: Any) -> str:
    """A chatbot message's text (Gradio may hand back a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_plain(part) for part in content)
    if isinstance(content, Mapping):
        return str(content.get("text") or content.get("content") or "")
    return str(content)
