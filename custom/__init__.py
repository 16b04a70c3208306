"""Components of the chestxray14_rpsal_detection bundle (RpSal: region proposals + saliency maps).

Configs reference them as ``custom.<module>.<Name>``; the exported bundle carries this package inside it.
"""
