from streamer.cli import run

run()
