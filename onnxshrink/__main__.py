from onnxshrink.cli import main

main()
