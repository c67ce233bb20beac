from prunekit.cli import main

main()
