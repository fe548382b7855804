"""``restore_file`` end to end: real PyAV decode/encode, real ZeroMQ, real workers."""

import json
import shutil
import subprocess
import threading

import av
import cv2
import numpy as np
import pytest

from gpen.weights import WeightsError
from streamer.faces.face import box_from_landmarks
from streamer.faces.faces_file import FacesFileError
from streamer.io.probe import MediaError
from configs.errors import Cancelled
from streamer.jobs.restore import restore_file
from tests.support.clips import (ASTRONAUT_LANDMARKS, astronaut, face_psnr, make_clip, psnr, read_frames,
                                read_packets)


def _restore(clip, out, settings, worker_settings, **overrides):
    faces = overrides.pop("faces_file", clip.faces_path)
    return restore_file(clip.path, out, settings(**overrides), worker_settings(), faces_file=faces)


def _no_leftovers(folder, keep=()):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep and ".part" in p.name) == []


def _ffprobe(path, *entries):
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                          ",".join(entries), "-of", "json", str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.fixture
def clip(tmp_path):
    return make_clip(tmp_path / "in.mp4", frames=12, motion="slow", subtitles=False)


def test_identity_round_trip_keeps_faces_frames_timestamps_and_audio(tmp_path, clip, settings, worker_settings):
    out = tmp_path / "out.mp4"
    result = _restore(clip, out, settings, worker_settings, model="identity", temporal="off")
    assert result.frames == clip.frames and result.faces == clip.frames and result.corrupt_frames == 0
    frames_in, pts_in, tb_in, _ = read_frames(clip.path)
    frames_out, pts_out, tb_out, _ = read_frames(out)
    assert (pts_out, tb_out) == (pts_in, tb_in)
    assert face_psnr(frames_out, frames_in, clip) > 40
    assert read_packets(out, "audio") == read_packets(clip.path, "audio") and clip.audio_packets > 0
    probe = _ffprobe(out, "stream=nb_read_frames,width,height,r_frame_rate,pix_fmt")["streams"][0]
    assert (int(probe["nb_read_frames"]), probe["width"], probe["height"], probe["r_frame_rate"],
            probe["pix_fmt"]) == (clip.frames, 320, 240, "25/1", "yuv420p")
    assert _no_leftovers(tmp_path)


def test_temporal_smoothing_keeps_a_clean_face_sharp(tmp_path, settings, worker_settings):
    clip = make_clip(tmp_path / "in.mp4", frames=12, motion="slow")
    out = tmp_path / "out.mp4"
    _restore(clip, out, settings, worker_settings, model="identity", temporal="full")
    assert face_psnr(read_frames(out)[0], read_frames(clip.path)[0], clip) > 38


def test_gpen_256_restores_faces_through_a_worker_process(tmp_path, settings, worker_settings, engine_settings,
                                                         gpen256_weights):
    clip = make_clip(tmp_path / "in.mp4", frames=6, motion="slow", face_px=70)
    out = tmp_path / "out.mp4"
    result = restore_file(clip.path, out, settings(model="GPEN-BFR-256"),
                          worker_settings(models={"GPEN-BFR-256": gpen256_weights}),
                          engine_settings=engine_settings(isolate_workers=True), faces_file=clip.faces_path)
    assert result.frames == 6 and result.faces == 6
    frames_in, _, _, _ = read_frames(clip.path)
    frames_out, _, _, _ = read_frames(out)
    box = clip.face_box(3)
    assert psnr(frames_out[3][box[1]:box[3], box[0]:box[2]], frames_in[3][box[1]:box[3], box[0]:box[2]]) < 25
    # far from the face the frame is untouched (lossless encode: bit-exact after decode)
    assert np.array_equal(frames_out[3][:, -40:], frames_in[3][:, -40:])


def test_display_rotation_is_applied_for_faces_and_kept_in_the_output(tmp_path, settings, worker_settings):
    clip = make_clip(tmp_path / "in.mp4", frames=6, width=240, height=320, rotation=90)
    out = tmp_path / "out.mp4"
    _restore(clip, out, settings, worker_settings, model="identity", temporal="off")
    frames_in, _, _, rot_in = read_frames(clip.path)
    frames_out, _, _, rot_out = read_frames(out)
    assert rot_in == rot_out == 90 and frames_out[0].shape == (320, 240, 3)
    assert face_psnr(frames_out, frames_in, clip) > 40
    assert face_psnr(frames_in, clip.clean, clip) > 30  # faces-file coordinates were the displayed ones


def test_variable_frame_rate_timestamps_are_preserved(tmp_path, settings, worker_settings):
    clip = make_clip(tmp_path / "in.mkv", frames=12, vfr=True)
    out = tmp_path / "out.mkv"
    _restore(clip, out, settings, worker_settings, model="identity")
    pts_in = read_frames(clip.path)[1]
    assert len(set(np.diff(pts_in))) > 1  # really variable
    assert read_frames(out)[1] == pts_in


def test_odd_sizes_and_10_bit_pixels_survive(tmp_path, settings, worker_settings):
    odd = make_clip(tmp_path / "odd.mp4", frames=4, width=161, height=121, face_px=60)
    _restore(odd, tmp_path / "odd-out.mp4", settings, worker_settings, model="identity")
    frames = read_frames(tmp_path / "odd-out.mp4")[0]
    assert frames[0].shape == (121, 161, 3)
    deep = make_clip(tmp_path / "deep.mp4", frames=4, pix_fmt="yuv420p10le")
    _restore(deep, tmp_path / "deep-out.mp4", settings, worker_settings, model="identity", temporal="off")
    with av.open(str(tmp_path / "deep-out.mp4")) as c:
        assert c.streams.video[0].codec_context.pix_fmt == "yuv420p10le"
    assert face_psnr(read_frames(tmp_path / "deep-out.mp4")[0], read_frames(deep.path)[0], deep) > 40


def test_subtitles_and_audio_are_copied_packet_for_packet(tmp_path, settings, worker_settings):
    clip = make_clip(tmp_path / "in.mkv", frames=6, subtitles=True)
    out = tmp_path / "out.mkv"
    _restore(clip, out, settings, worker_settings, model="identity")
    for kind in ("subtitle", "audio"):
        assert read_packets(out, kind) == read_packets(clip.path, kind) and read_packets(out, kind)


def test_streams_mp4_cannot_hold_are_refused_with_a_suggestion(tmp_path, settings, worker_settings):
    clip = make_clip(tmp_path / "in.mkv", frames=4, subtitles=True)
    with pytest.raises(MediaError, match="write .mkv instead"):
        _restore(clip, tmp_path / "out.mp4", settings, worker_settings, model="identity")
    assert list(tmp_path.glob("out*")) == [] and _no_leftovers(tmp_path)


def test_frames_without_faces_come_out_unchanged(tmp_path, clip, settings, worker_settings):
    empty = tmp_path / "none.jsonl"
    empty.write_text("")
    out = tmp_path / "out.mp4"
    result = _restore(clip, out, settings, worker_settings, model="identity", faces_file=empty)
    assert result.faces == 0
    assert all(np.array_equal(a, b) for a, b in zip(read_frames(out)[0], read_frames(clip.path)[0]))


def test_thirty_faces_in_one_frame_are_all_restored(tmp_path, settings, worker_settings):
    src = astronaut()
    tile, cols, rows = 64, 6, 5
    grid = np.zeros((rows * tile, cols * tile, 3), np.uint8)
    faces = []
    for r in range(rows):
        for c in range(cols):
            m = cv2.getRotationMatrix2D((225.0, 122.0), 0, 0.35)
            m[:, 2] += (c * tile + tile / 2 - 225, r * tile + tile / 2 - 122)
            grid[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = cv2.warpAffine(
                src, m, (cols * tile, rows * tile))[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
            lm = ASTRONAUT_LANDMARKS @ m[:, :2].T + m[:, 2]
            faces.append({"landmarks": lm.tolist(), "box": box_from_landmarks(lm).tolist()})
    path = tmp_path / "crowd.mp4"
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=25, options={"crf": "0"})
        s.width, s.height, s.pix_fmt = grid.shape[1], grid.shape[0], "yuv420p"
        for _ in range(3):
            for p in s.encode(av.VideoFrame.from_ndarray(grid, format="rgb24")):
                out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    faces_file = tmp_path / "crowd.jsonl"
    faces_file.write_text("".join(json.dumps({"frame": i, "faces": faces}) + "\n" for i in range(3)))
    result = restore_file(path, tmp_path / "out.mp4", settings(model="identity", temporal="off", min_face=0),
                          worker_settings(batch=8), faces_file=faces_file)
    assert result.faces == 90
    assert psnr(read_frames(tmp_path / "out.mp4")[0][1], read_frames(path)[0][1]) > 40


# ------------------------------------------------------------------ bad input: clear errors, nothing written


def _assert_fails_cleanly(tmp_path, exc, match, run):
    with pytest.raises(exc, match=match):
        run()
    assert not (tmp_path / "out.mp4").exists() and _no_leftovers(tmp_path)


def test_missing_input(tmp_path, settings, worker_settings):
    _assert_fails_cleanly(tmp_path, MediaError, "input not found", lambda: restore_file(
        tmp_path / "nope.mp4", tmp_path / "out.mp4", settings(model="identity"), worker_settings()))


def test_a_text_file_is_not_a_video(tmp_path, settings, worker_settings):
    text = tmp_path / "notes.mp4"
    text.write_text("hello\n" * 1000)
    _assert_fails_cleanly(tmp_path, MediaError, "not a readable video file", lambda: restore_file(
        text, tmp_path / "out.mp4", settings(model="identity"), worker_settings()))


def test_audio_only_files_have_no_video_stream(tmp_path, settings, worker_settings):
    song = tmp_path / "song.m4a"
    with av.open(str(song), "w") as out:
        a = out.add_stream("aac", rate=48000)
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 48000, i * 1024
            for p in a.encode(frame):
                out.mux(p)
    _assert_fails_cleanly(tmp_path, MediaError, "no video stream", lambda: restore_file(
        song, tmp_path / "out.mp4", settings(model="identity"), worker_settings()))


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_truncated_files_fail(tmp_path, settings, worker_settings, suffix):
    clip = make_clip(tmp_path / f"full{suffix}", frames=40, subtitles=False)
    data = clip.path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[:len(data) // 2])
    _assert_fails_cleanly(tmp_path, MediaError, "truncated", lambda: restore_file(
        cut, tmp_path / "out.mp4", settings(model="identity"), worker_settings(), faces_file=clip.faces_path))


def test_corrupt_frames_are_skipped_and_counted_or_fail_when_asked(tmp_path, settings, worker_settings):
    clip = make_clip(tmp_path / "in.mp4", frames=40, crf=23)
    data = bytearray(clip.path.read_bytes())
    with av.open(str(clip.path)) as c:  # give one video packet an impossible NAL unit length
        packets = [p for p in c.demux(video=0) if p.size > 100]
        victim = packets[len(packets) // 2]
    data[victim.pos:victim.pos + 4] = b"\xff\xff\xff\xff"
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    result = restore_file(bad, tmp_path / "skipped.mp4", settings(model="identity"), worker_settings(),
                          faces_file=clip.faces_path)
    assert (result.frames, result.corrupt_frames) == (39, 1)
    assert len(read_frames(tmp_path / "skipped.mp4")[0]) == 39
    with pytest.raises(MediaError, match="undecodable"):
        restore_file(bad, tmp_path / "out.mp4", settings(model="identity", corrupt_frames="fail"), worker_settings(),
                     faces_file=clip.faces_path)
    assert not (tmp_path / "out.mp4").exists() and _no_leftovers(tmp_path)


def test_output_folder_must_exist_and_be_writable(tmp_path, clip, settings, worker_settings):
    with pytest.raises(MediaError, match="does not exist"):
        _restore(clip, tmp_path / "missing" / "out.mp4", settings, worker_settings, model="identity")
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a read-only folder here (chattr)")
    try:
        with pytest.raises(MediaError, match="not writable|Permission|Operation not permitted"):
            _restore(clip, locked / "out.mp4", settings, worker_settings, model="identity")
    finally:
        subprocess.run(["chattr", "-i", str(locked)])


def test_missing_weights_fail_before_any_work_with_where_to_put_them(tmp_path, clip, settings, worker_settings):
    _assert_fails_cleanly(tmp_path, WeightsError, "(?s)GPEN-BFR-512.pth.*place it at", lambda: _restore(
        clip, tmp_path / "out.mp4", settings, worker_settings, model="GPEN-BFR-512"))


def test_a_malformed_faces_file_names_the_line(tmp_path, clip, settings, worker_settings):
    bad = tmp_path / "faces.jsonl"
    bad.write_text('{"frame": 0, "faces": []}\n{"frame": 1, "faces": [{"landmarks": [[1, 2]]}]}\n')
    _assert_fails_cleanly(tmp_path, FacesFileError, "faces.jsonl:2", lambda: _restore(
        clip, tmp_path / "out.mp4", settings, worker_settings, model="identity", faces_file=bad))


def test_cancelling_leaves_no_output(tmp_path, settings, worker_settings, engine_settings):
    clip = make_clip(tmp_path / "in.mp4", frames=60)
    cancel = threading.Event()

    def progress(p):
        if p.frames_done >= 5:
            cancel.set()

    with pytest.raises(Cancelled):
        restore_file(clip.path, tmp_path / "out.mp4", settings(model="identity"), worker_settings(),
                     engine_settings=engine_settings(max_frames_in_flight=4), faces_file=clip.faces_path,
                     progress=progress, cancel=cancel)
    assert not (tmp_path / "out.mp4").exists() and _no_leftovers(tmp_path)


def test_progress_reports_frames_and_total(tmp_path, clip, settings, worker_settings):
    seen = []
    restore_file(clip.path, tmp_path / "out.mp4", settings(model="identity"), worker_settings(),
                 faces_file=clip.faces_path, progress=seen.append)
    assert seen[-1].frames_done == clip.frames and seen[-1].frames_total == clip.frames
    assert [p.frames_done for p in seen] == sorted(p.frames_done for p in seen)


def test_an_existing_output_is_replaced_atomically(tmp_path, clip, settings, worker_settings):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"old")
    _restore(clip, out, settings, worker_settings, model="identity")
    assert out.stat().st_size > 1000 and _no_leftovers(tmp_path)
    assert shutil.which("ffprobe") and _ffprobe(out, "stream=codec_name")["streams"][0]["codec_name"] == "h264"


def test_audio_that_outlasts_the_video_is_not_mistaken_for_truncation(tmp_path, settings, worker_settings):
    clip = make_clip(tmp_path / "in.mkv", frames=12, audio_extra_s=3.0)
    out = tmp_path / "out.mkv"
    _restore(clip, out, settings, worker_settings, model="identity")
    assert len(read_frames(out)[0]) == 12 and read_packets(out, "audio") == read_packets(clip.path, "audio")


def test_audio_that_outlasts_the_video_is_copied_as_it_is_read_not_held_whole(tmp_path, settings, worker_settings,
                                                                              monkeypatch):
    """After the last frame the other streams' packets are copied as the decoder reads them: at
    most PACKETS_AHEAD_MAX are held (the review's 15 min of PCM after 2 s of video took 200 MiB)."""
    import streamer.pipeline as pipeline

    clip = make_clip(tmp_path / "in.mkv", frames=12, audio_extra_s=20.0)
    monkeypatch.setattr(pipeline, "PACKETS_AHEAD_MAX", 32)
    held = []
    hold = pipeline._Stages._hold_packet

    def spy(stages, packet):
        hold(stages, packet)
        held.append(len(stages.packets))

    monkeypatch.setattr(pipeline._Stages, "_hold_packet", spy)
    out = tmp_path / "out.mkv"
    _restore(clip, out, settings, worker_settings, model="identity")
    assert len(read_frames(out)[0]) == 12 and read_packets(out, "audio") == read_packets(clip.path, "audio")
    assert len(held) > 200 and max(held) <= 33


def _ffmpeg(*args):
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", *args], check=True, capture_output=True)


VIDEO_2S = ["-f", "lavfi", "-i", "testsrc2=s=160x120:r=25:d=2"]  # 50 frames
# Complete files that end by the book, as ffmpeg makes them: (suffix, arguments, video frames).
COMPLETE = {
    # libavformat gives the H.264 stream the container's duration (the audio's 20 s)
    "h264_mkv_whose_audio_outlasts_the_video": (".mkv", [*VIDEO_2S, "-f", "lavfi", "-i", "sine=d=20", "-c:v",
                                                         "libx264", "-c:a", "aac"], 50),
    # Matroska's DURATION tag is the video's end time (5 s), not its length (3 s)
    "mkv_whose_video_starts_2s_after_the_audio": (".mkv", ["-f", "lavfi", "-i", "sine=d=5", "-itsoffset", "2",
                                                           "-f", "lavfi", "-i", "testsrc2=s=160x120:r=25:d=3",
                                                           "-map", "1:v", "-map", "0:a", "-c:v", "libx264",
                                                           "-c:a", "aac"], 75),
    "flv_whose_video_starts_2s_after_the_audio": (".flv", ["-f", "lavfi", "-i", "sine=d=5", "-itsoffset", "2",
                                                           "-f", "lavfi", "-i", "testsrc2=s=160x120:r=25:d=3",
                                                           "-map", "1:v", "-map", "0:a", "-c:v", "libx264",
                                                           "-c:a", "aac", "-fps_mode", "passthrough"], 75),
}


@pytest.mark.parametrize("name", COMPLETE)
def test_complete_files_whose_streams_end_or_start_apart_are_not_taken_for_truncated(tmp_path, settings,
                                                                                     worker_settings, name):
    suffix, args, frames = COMPLETE[name]
    src, out = tmp_path / f"in{suffix}", tmp_path / "out.mkv"
    _ffmpeg(*args, str(src))
    result = restore_file(src, out, settings(model="identity"), worker_settings(), faces_file=_no_faces(tmp_path))
    assert result.frames == frames and len(read_frames(out)[0]) == frames
    assert len(read_packets(out, "audio")) == len(read_packets(src, "audio")) > 0


def test_our_own_mkv_of_a_ts_input_can_be_restored_again(tmp_path, settings, worker_settings):
    # MPEG-TS starts at 1.4 s, and the .mkv keeps that start: its DURATION tags are end times
    ts, first, again = tmp_path / "in.ts", tmp_path / "first.mkv", tmp_path / "again.mkv"
    _ffmpeg(*VIDEO_2S, "-f", "lavfi", "-i", "sine=d=2", "-c:v", "libx264", "-c:a", "aac", str(ts))
    faces = _no_faces(tmp_path)
    restore_file(ts, first, settings(model="identity"), worker_settings(), faces_file=faces)
    result = restore_file(first, again, settings(model="identity"), worker_settings(), faces_file=faces)
    assert result.frames == 50 and len(read_frames(again)[0]) == 50


def _no_faces(folder):
    faces = folder / "faces.jsonl"
    faces.write_text("")
    return faces


def test_file_names_with_colons_are_files_not_protocols(tmp_path, settings, worker_settings):
    clip = make_clip(tmp_path / "take:1.mp4", frames=3)
    out = tmp_path / "take:1 restored.mp4"
    _restore(clip, out, settings, worker_settings, model="identity")
    assert len(read_frames(out)[0]) == 3


def test_cover_art_is_not_a_video_stream(tmp_path, settings, worker_settings):
    song, cover, tagged = tmp_path / "song.m4a", tmp_path / "cover.png", tmp_path / "tagged.m4a"
    cv2.imwrite(str(cover), np.zeros((32, 32, 3), np.uint8))
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac", str(song)],
                   check=True)
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(song), "-i", str(cover), "-map", "0", "-map", "1", "-c", "copy",
                    "-disposition:v", "attached_pic", str(tagged)], check=True)
    _assert_fails_cleanly(tmp_path, MediaError, "no video stream", lambda: restore_file(
        tagged, tmp_path / "out.mp4", settings(model="identity"), worker_settings()))


def test_outputs_get_ordinary_permissions(tmp_path, clip, settings, worker_settings):
    import os

    umask = os.umask(0o022)
    try:
        out = tmp_path / "out.mp4"
        _restore(clip, out, settings, worker_settings, model="identity")
        assert out.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)
